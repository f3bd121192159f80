// The per-thread K-means workspaces of the CPU backend: one per thread, bounded between calls.
#include "kmeans/workspace.h"

namespace popcomp {
namespace kmeans {
namespace {

// Each thread keeps its workspace between calls: fresh pages are expensive (first-touch
// faults cost more than the sort itself at n = 1e6), so repeated calls reuse them. A thread
// keeps at most kKeepBytes; larger workspaces are released after the call.
constexpr size_t kKeepBytes = size_t(256) << 20;

}  // namespace

Work& thread_work() {
  static thread_local Work w;
  return w;
}

void trim_work(Work& w) {
  if (w.bytes() > kKeepBytes) w = Work();
}

}  // namespace kmeans
}  // namespace popcomp
