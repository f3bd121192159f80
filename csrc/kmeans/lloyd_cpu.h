// Lloyd's method for one K-means problem on the CPU: its initial centers and its iterations.
#pragma once
#include <cstdint>

#include "kmeans/kmeans.h"
#include "kmeans/kmeans_math.h"

namespace popcomp {
namespace kmeans {

// Centers c[0..k) of problem `row` (k < u) by Lloyd's method: initialized as p.init says
// (init_centers: Buffers::init_centers, in the original coordinates, which the prefix sums P
// have shifted by `shift`; k-means++ seeded by p.seed and the row), then kmeans_math.h's
// iterations. Returns the number of iterations; *obj gets the final objective.
int lloyd_centers(const Params& p, const Prefix& P, int64_t row, const double* init_centers,
                  double shift, const Scratch& sc, double* c, double* obj);

}  // namespace kmeans
}  // namespace popcomp
