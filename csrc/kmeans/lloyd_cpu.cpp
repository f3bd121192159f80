// Lloyd's method for one K-means problem on the CPU: its initial centers and its iterations.
#include "kmeans/lloyd_cpu.h"

namespace popcomp {
namespace kmeans {

int lloyd_centers(const Params& p, const Prefix& P, int64_t row, const double* init_centers,
                  double shift, const Scratch& sc, double* c, double* obj) {
  const int k = p.k;
  switch (p.init) {
    case Init::linear: init_linear(P, k, c); break;
    case Init::quantile: init_quantile(P, k, c); break;
    case Init::given:
      for (int j = 0; j < k; ++j) c[j] = init_centers[(size_t)row * k + j] - shift;
      break;
    default: {
      SplitMix64 rng(p.seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(row + 1)));
      init_kmeanspp(P, k, c, rng, sc);
    }
  }
  return lloyd(P, k, c, p.beta, p.diameter, p.max_iter, p.tol, sc, obj);
}

}  // namespace kmeans
}  // namespace popcomp
