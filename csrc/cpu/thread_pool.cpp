#include "thread_pool.h"

#include <pthread.h>

#include <chrono>

#include <cstdlib>
#include <memory>

namespace pykernels {
namespace cpu {

namespace {
constexpr std::chrono::microseconds kSpin(300);
std::mutex g_pool_mu;
ThreadPool* g_pool = nullptr;
int g_requested = 0;  // 0: not set yet

void atfork_child() {
  // The worker threads do not exist in the child: drop the pool without joining them.
  g_pool = nullptr;
  new (&g_pool_mu) std::mutex();
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

ThreadPool& ThreadPool::instance() {
  static bool registered = [] { pthread_atfork(nullptr, nullptr, atfork_child); return true; }();
  (void)registered;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  int want = g_requested > 0 ? g_requested : default_threads();
  if (g_pool == nullptr || g_pool->size() != want) {
    delete g_pool;
    g_pool = new ThreadPool(want);
  }
  return *g_pool;
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
