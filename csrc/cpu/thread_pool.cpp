#include "thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

namespace pykernels {
namespace cpu {

namespace {
constexpr std::chrono::microseconds kSpin(300);
std::mutex g_pool_mu;
std::shared_ptr<ThreadPool> g_pool;
int g_requested = 0;  // 0: not set yet

// Set in a forked child: GNU OpenMP cannot be used there once the parent has used it (the
// child inherits a team whose threads do not exist), so the child runs on our pool.
std::atomic<bool> g_forked{false};

void atfork_child() {
  // The worker threads do not exist in the child: drop the pool without joining them (its
  // memory is leaked on purpose: destroying it would join threads that are not there).
  new (&g_pool) std::shared_ptr<ThreadPool>();
  new (&g_pool_mu) std::mutex();
  g_forked.store(true);
}

// Registered when the extension loads: a fork may come before the first kernel call.
const bool g_atfork_registered = [] { return pthread_atfork(nullptr, nullptr, atfork_child) == 0; }();

// The GNU OpenMP entry points, looked up in the process (never linked: the extension must not
// bring an OpenMP runtime of its own, which would be a second team on the same cores).
// GOMP_parallel is libgomp's stable ABI for `#pragma omp parallel` since GCC 4.9.
struct Gomp {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
};

const Gomp* gomp() {
  static std::atomic<const Gomp*> found{nullptr};
  const Gomp* g = found.load(std::memory_order_acquire);
  if (g) return g;
  // Not cached while absent: a runtime may be loaded later (torch imported after us).
  void* par = dlsym(RTLD_DEFAULT, "GOMP_parallel");
  void* num = dlsym(RTLD_DEFAULT, "omp_get_thread_num");
  if (!par || !num) return nullptr;
  static Gomp table;
  table.parallel = reinterpret_cast<void (*)(void (*)(void*), void*, unsigned, unsigned)>(par);
  table.thread_num = reinterpret_cast<int (*)()>(num);
  found.store(&table, std::memory_order_release);
  return &table;
}

enum class Mode { kAuto, kOpenMP, kPool };

Mode threading_mode() {
  const char* e = std::getenv("PYKERNELS_THREADING");
  if (e == nullptr || *e == 0 || std::strcmp(e, "auto") == 0) return Mode::kAuto;
  if (std::strcmp(e, "openmp") == 0) return Mode::kOpenMP;
  if (std::strcmp(e, "pool") == 0) return Mode::kPool;
  throw std::invalid_argument(std::string("PYKERNELS_THREADING: expected auto, openmp or pool, got '") + e + "'");
}

// The OpenMP runtime to use for the next job, or nullptr for our pool.
const Gomp* openmp_for_job() {
  const Mode mode = threading_mode();
  if (mode == Mode::kPool) return nullptr;
  const Gomp* g = g_forked.load() ? nullptr : gomp();
  if (!g && mode == Mode::kOpenMP)
    throw std::invalid_argument(g_forked.load()
        ? "PYKERNELS_THREADING=openmp: GNU OpenMP cannot be used in a forked child"
        : "PYKERNELS_THREADING=openmp: no GNU OpenMP runtime (libgomp) is loaded in this process");
  return g;
}

struct OmpJob {
  const std::function<void(int64_t, int)>* fn;
  int64_t n_tasks;
  std::atomic<int64_t> next{0};
  const Gomp* g;
};

void omp_body(void* data) {
  OmpJob* job = static_cast<OmpJob*>(data);
  const int index = job->g->thread_num();
  for (;;) {
    int64_t t = job->next.fetch_add(1, std::memory_order_relaxed);
    if (t >= job->n_tasks) break;
    (*job->fn)(t, index);
  }
}

int default_threads() {
  if (const char* e = std::getenv("PYKERNELS_NUM_THREADS")) {
    int n = std::atoi(e);
    if (n > 0) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? (int)hc : 1;
}
}  // namespace

int parallel_threads() { return ThreadPool::num_threads(); }

const char* parallel_runtime() { return openmp_for_job() ? "openmp" : "pool"; }

void parallel_run(int64_t n_tasks, int nthreads, const std::function<void(int64_t, int)>& fn) {
  if (n_tasks <= 0) return;
  const int n = nthreads < 1 ? 1 : nthreads;
  threading_mode();  // a bad PYKERNELS_THREADING is an error even when no thread is started
  if (n == 1 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  if (const Gomp* g = openmp_for_job()) {
    // A team of at most n threads (fewer when nested in another region); thread numbers < n.
    OmpJob job{&fn, n_tasks, {0}, g};
    g->parallel(omp_body, &job, (unsigned)(n_tasks < n ? n_tasks : n), 0);
    return;
  }
  ThreadPool::acquire(n)->run(n_tasks, fn);
}

std::shared_ptr<ThreadPool> ThreadPool::acquire(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool || g_pool->size() != n) g_pool = std::make_shared<ThreadPool>(n);
  return g_pool;
}

void ThreadPool::set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_requested = n > 0 ? n : 0;
}

int ThreadPool::num_threads() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_requested > 0 ? g_requested : default_threads();
}

ThreadPool::ThreadPool(int n) : nthreads_(n < 1 ? 1 : n) {
  for (int i = 1; i < nthreads_; ++i) threads_.emplace_back(&ThreadPool::worker, this, i);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::work_on_job(int index) {
  for (;;) {
    int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    if (t >= n_tasks_) break;
    (*fn_)(t, index);
  }
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    // Spin for up to kSpin before sleeping: decode calls one kernel per layer with a little
    // Python in between, and waking a sleeping thread (worse: a halted vCPU) can cost more than
    // a whole kernel. OpenMP runtimes make the same trade (GOMP_SPINCOUNT, KMP_BLOCKTIME).
    uint64_t g = generation_.load(std::memory_order_acquire);
    if (g == seen) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int spin = 0; g == seen; ++spin) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
        g = generation_.load(std::memory_order_acquire);
        if ((spin & 255) == 255 && std::chrono::steady_clock::now() > until) break;
      }
    }
    if (g == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_.load() != seen; });
      g = generation_.load();
    }
    seen = g;
    if (stop_) return;
    work_on_job(index);
    busy_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
  if (n_tasks <= 0) return;
  if (nthreads_ == 1 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  std::lock_guard<std::mutex> job(run_mu_);
  fn_ = &fn;
  n_tasks_ = n_tasks;
  next_.store(0);
  busy_.store(nthreads_ - 1);
  {
    std::lock_guard<std::mutex> lk(mu_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_.notify_all();
  work_on_job(0);
  while (busy_.load(std::memory_order_acquire) != 0) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  fn_ = nullptr;
}

}  // namespace cpu
}  // namespace pykernels
