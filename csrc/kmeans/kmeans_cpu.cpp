#include <stdexcept>

#include "kmeans/kmeans.h"

namespace popcomp {
namespace kmeans {
void run_cpu(const Params&, const Buffers&, int) { throw std::runtime_error("not implemented yet"); }
}  // namespace kmeans
}  // namespace popcomp
