// Persistent thread pool for the CPU kernels. The calling thread takes part; workers spin
// briefly after a job (decode issues many short jobs back to back), then sleep.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pykernels {
namespace cpu {

class ThreadPool {
 public:
  // The process-wide pool. Rebuilt lazily after fork() (threads do not survive it).
  static ThreadPool& instance();
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
