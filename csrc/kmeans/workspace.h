// The CPU K-means per-thread workspace: every buffer one problem needs, kept between calls.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/radix_sort.h"
#include "kmeans/kmeans_math.h"

namespace popcomp {
namespace kmeans {

// An array whose elements are left uninitialized when it grows (std::vector zeroes them):
// for the DP's k x u argmin table, of which each call writes and reads only the bands it
// solves, zeroing would touch every page of it (1 GB at k = 256, u = 1e6) on every call that
// grows it.
template <typename T>
struct RawArray {
  std::unique_ptr<T[]> p;
  size_t n = 0, cap = 0;
  void resize(size_t m) {
    if (m > cap) {
      p.reset(new T[m]);  // default-initialized: no stores
      cap = m;
    }
    n = m;
  }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
  size_t size() const { return n; }
  size_t capacity() const { return cap; }
  T& operator[](size_t i) { return p[i]; }
  const T& operator[](size_t i) const { return p[i]; }
};

// Everything one problem needs, grown on demand and reused by the thread's next problems.
struct Work {
  std::vector<uint64_t> k64, t64;       // sort items of 32-bit keys
  std::vector<KeyPay64> kp64, tkp64;    // sort items of 64-bit keys
  std::vector<uint32_t> idx;            // the sort permutation (small problems)
  std::vector<uint32_t> hcnt;
  std::vector<double> hw;
  std::vector<double> v, vo, W, s0, s1, s2;
  std::vector<double> D1, d, blocks;
  RawArray<int32_t> J;                  // the DP's argmins, k x u
  std::vector<int64_t> Bk, Bk2;
  std::vector<double> dk[6];
  std::vector<int> act;
  std::vector<double> c, mids;
  std::vector<int32_t> lut, ulab;
  std::vector<uint32_t> run;
  std::vector<double> gw;               // weights in sorted order (those not carried)
  std::vector<double> pdd;              // double-double prefix sums (exact_dp_precise.cpp)
  std::vector<double> Dl;               // a coarse problem's D values (demand_hint)
  std::vector<int64_t> top;             // and its highest rows known exact
  std::unique_ptr<Work> coarse;         // the coarse problem of demand_hint, kept for reuse

  // Bytes held (to bound what a thread keeps between calls).
  size_t bytes() const {
    size_t b = 0;
    auto add = [&b](const auto& v) { b += v.capacity() * sizeof(v[0]); };
    add(k64); add(t64); add(kp64); add(tkp64); add(idx); add(hcnt); add(hw);
    add(v); add(vo); add(W); add(s0); add(s1); add(s2); add(D1); add(d); add(blocks); add(J); add(ulab);
    add(run); add(lut); add(gw); add(pdd); add(Dl); add(top);
    add(Bk); add(Bk2); add(act); add(c); add(mids);  // the k-sized scratch
    for (const auto& v : dk) add(v);
    return b + (coarse ? coarse->bytes() : 0);
  }

  Scratch scratch(int k) {
    Bk.resize(k + 1);
    Bk2.resize(k + 1);
    for (auto& d : dk) d.resize(k + 1);
    act.resize(k + 1);
    return Scratch{Bk.data(), Bk2.data(), dk[0].data(), dk[1].data(), dk[2].data(),
                   dk[3].data(), dk[4].data(), act.data()};
  }
};

// The calling thread's workspace, kept between calls (workspace.cpp says why).
Work& thread_work();
// After a call: releases w when it holds more than a thread keeps.
void trim_work(Work& w);

}  // namespace kmeans
}  // namespace popcomp
