// Threads for the CPU kernels.
//
// parallel_run() is what kernels call. When the process already has a GNU OpenMP runtime
// loaded (torch's CPU wheels bring libgomp and run every intra-op parallel region on it), the
// job runs as an OpenMP parallel region on that same team of threads: two pools on the same
// cores fight, because an idle OpenMP worker spins for milliseconds after each torch op and
// takes the core our worker needs (measured: decode attention 1.5x slower, 2x more variable).
// Without such a runtime (or after fork(), or with PYKERNELS_THREADING=pool) the job runs on
// our own persistent pool, whose workers spin briefly after a job and then sleep.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pykernels {
namespace cpu {

// fn(task, thread_index) for every task in [0, n_tasks), tasks claimed dynamically, on at most
// nthreads threads; thread_index < nthreads always (callers size per-thread scratch with it, so
// read parallel_threads() once per call and pass that value: another Python thread may call
// set_num_threads meanwhile). Returns when all tasks have finished.
void parallel_run(int64_t n_tasks, int nthreads, const std::function<void(int64_t, int)>& fn);
int parallel_threads();
// "openmp" or "pool": where the next parallel_run() goes (PYKERNELS_THREADING=auto|openmp|pool).
const char* parallel_runtime();

class ThreadPool {
 public:
  // The process-wide pool with exactly n threads (rebuilt when n changes; a caller's reference
  // keeps the pool it got alive until its job is done). Dropped after fork() (threads do not
  // survive it).
  static std::shared_ptr<ThreadPool> acquire(int n);
  static void set_num_threads(int n);
  static int num_threads();

  explicit ThreadPool(int n);
  ~ThreadPool();

  // fn(task, thread_index) for every task in [0, n_tasks); thread_index < size().
  // Tasks are claimed dynamically; returns when all have finished.
  void run(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);
  int size() const { return nthreads_; }

 private:
  void worker(int index);
  void work_on_job(int index);

  int nthreads_;
  std::vector<std::thread> threads_;
  std::mutex mu_;          // guards generation_/stop_ for the condition variable
  std::mutex run_mu_;      // one job at a time
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> busy_{0};
};

}  // namespace cpu
}  // namespace pykernels
