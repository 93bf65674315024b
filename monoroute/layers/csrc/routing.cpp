// The router's two searches on the CPU, compiled (layers/compiled.py builds this file at first use):
//
// product_topk: per row, the exact top k of all n*n sums s1[a] + s2[b] (the product-key search).
// The same algorithm as the torch form (product_key.py: product_topk), fused per row so that no
// (rows, ~1,200) intermediate is written and no general-purpose top-k runs:
//   1. sort each half's n scores, decreasing (an LSD radix sort of 32-bit order-preserving keys:
//      half the time of std::sort at n = 128; only the first k_sub = min(k, n) ranks are used);
//   2. the rank pairs (i, j) with (i+1)(j+1) <= k are the only ones that can reach the top k (pair
//      (i, j) is beaten by the (i+1)(j+1) - 1 pairs of lower ranks): ~k ln k sums, row-major, of
//      which only those >= a lower bound of the k-th largest sum are kept (the smallest staircase
//      (i+1)(j+1) <= c holding >= k pairs: its lowest sum, read at its corners; then raised by a few
//      bisection steps that count the pairs above it);
//   3. the k largest kept sums by a radix select on the order-preserving keys (256-bin histograms of
//      the keys' own range, keeping one bucket a pass; no comparison sort), ties broken by pattern
//      position.
// float32 takes the radix path; float64 (the tests' reference dtype) sorts and selects with the
// standard library. Returns (rows, k) unit ids a*n + b and their sums, in no particular order, as
// torch's topk(sorted=False) does.
//
// rerank: per token, the C candidates' exact pre-activations w[u]·x + b[u] (one SIMD dot per
// candidate row, read in place: no (T, C, d) gather, no CSR pattern) and the positions of the k
// largest (the same radix select), i.e. sampled_addmm + topk of the torch form in one pass.
//
// Rows run in parallel on torch's intra-op thread pool (at::parallel_for, OpenMP).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace {

// float -> uint32 with the same order (larger float, larger key)
inline uint32_t ordered(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The k-th largest of key[0..c) (order-preserving keys; 1 <= k <= c) by a radix select over the keys' own
// range: each pass buckets the remaining keys by the top 8 bits of (key - min), keeps only the bucket that
// holds the k-th largest (copied to tmp) and goes on inside it, until a bucket holds one value. Keys that
// lie close together (a row's best pair sums, the candidates' pre-activations) spread over a bucket each,
// so after the first level (min and max, histogram, keep: three passes over c) only a few keys remain, where
// a fixed four-byte select makes four histogram passes over all c (c 256, k 32: 1.23 -> 0.62 us).
// *ties is set to how many keys equal to the result are among the k largest: taking every key > the
// result and the first *ties keys == it gives the k largest.
uint32_t kth_largest_key(const uint32_t* key, int64_t c, int64_t k, int64_t* ties, std::vector<uint32_t>& tmp) {
  tmp.resize(static_cast<size_t>(c));
  const uint32_t* src = key;
  uint32_t* kept = tmp.data();
  int64_t need = k;  // how many of the remaining keys must still be taken
  uint32_t hist[256];
  for (;;) {
    uint32_t lo = src[0], hi = src[0];
    for (int64_t p = 1; p < c; ++p) {
      lo = std::min(lo, src[p]);
      hi = std::max(hi, src[p]);
    }
    const uint32_t range = hi - lo;
    if (range == 0) {
      *ties = need;
      return lo;
    }
    const int bits = 32 - __builtin_clz(range);
    const int shift = bits > 8 ? bits - 8 : 0;  // (key - lo) >> shift < 256
    std::memset(hist, 0, sizeof hist);
    for (int64_t p = 0; p < c; ++p) ++hist[(src[p] - lo) >> shift];
    uint32_t bucket = range >> shift;
    for (; bucket > 0 && static_cast<int64_t>(hist[bucket]) < need; --bucket) need -= hist[bucket];
    if (shift == 0) {  // one value per bucket
      *ties = need;
      return lo + bucket;
    }
    int64_t m = 0;  // keep the chosen bucket (in place once src is tmp: m <= p)
    for (int64_t p = 0; p < c; ++p) {
      kept[m] = src[p];
      m += ((src[p] - lo) >> shift) == bucket;
    }
    src = kept;
    c = m;
  }
}

struct Pattern {  // rank pairs (i, j), (i+1)(j+1) <= k, i, j < k_sub; row-major
  int64_t k_sub = 0;
  std::vector<int32_t> width, pi, pj;
  Pattern(int64_t k, int64_t n) {
    k_sub = std::min(k, n);
    width.resize(k_sub);
    for (int64_t i = 0; i < k_sub; ++i) {
      width[i] = static_cast<int32_t>(std::min<int64_t>(k_sub, k / (i + 1)));
      for (int32_t j = 0; j < width[i]; ++j) {
        pi.push_back(static_cast<int32_t>(i));
        pj.push_back(j);
      }
    }
    staircase(k);
  }
  // the smallest staircase (i+1)(j+1) <= c (i, j < k_sub) holding >= k pairs: its lowest sum is a
  // lower bound of the k-th largest sum; its row widths give the corners to read it from
  std::vector<int32_t> corner;
  void staircase(int64_t k) {  // c <= k: the staircase lies inside the pattern
    for (int64_t c = 1;; ++c) {
      int64_t count = 0;
      corner.clear();
      for (int64_t i = 0; i < std::min(c, k_sub); ++i) {
        const int64_t w = std::min<int64_t>(k_sub, c / (i + 1));
        count += w;
        corner.push_back(static_cast<int32_t>(w));
      }
      if (count >= k) return;
    }
  }
  int64_t size() const { return static_cast<int64_t>(pi.size()); }
};

// indices of x[0..n) in decreasing order of value (ties: lower index first): an LSD radix sort of
// the inverted order-preserving keys (stable, so equal values keep index order), 8 bits a pass
void sort_half(const float* x, int64_t n, int64_t m, std::vector<uint64_t>& keys, std::vector<int32_t>& order,
               std::vector<float>& values) {
  // keys holds (inverted key << 32 | index) in two halves of scratch: [0, n) and [n, 2n)
  uint64_t* src = keys.data();
  uint64_t* dst = keys.data() + n;
  for (int64_t t = 0; t < n; ++t) src[t] = (static_cast<uint64_t>(~ordered(x[t])) << 32) | static_cast<uint32_t>(t);
  uint32_t count[256];
  for (int shift = 32; shift < 64; shift += 8) {
    std::memset(count, 0, sizeof count);
    for (int64_t t = 0; t < n; ++t) ++count[(src[t] >> shift) & 255u];
    uint32_t sum = 0;
    for (int d = 0; d < 256; ++d) { const uint32_t c = count[d]; count[d] = sum; sum += c; }
    for (int64_t t = 0; t < n; ++t) dst[count[(src[t] >> shift) & 255u]++] = src[t];
    std::swap(src, dst);
  }
  for (int64_t r = 0; r < m; ++r) {
    order[r] = static_cast<int32_t>(static_cast<uint32_t>(src[r]));
    values[r] = x[order[r]];
  }
}

// A lower bound of the k-th largest pattern sum, raised by bisection: a value tau is a lower bound exactly
// when >= k pattern pairs sum to >= tau, which is counted along the staircase of the sorted lists
// (stopping at k). The staircase bound keeps ~2.6 k pairs at k 256, n 128; four steps keep ~1.2 k, so the
// pairs written and selected halve (search 6.0 -> 5.0 us per row). The counts use the pairs' own float
// sums, so every pair of the top k stays >= the bound.
constexpr int kBoundSteps = 4;

float raise_bound(const float* v1, const float* v2, const Pattern& pat, int64_t k, float bound) {
  float hi = v1[0] + v2[0];  // the largest sum: no bound above it is needed
  for (int step = 0; step < kBoundSteps; ++step) {
    const float mid = bound + (hi - bound) * 0.5f;
    if (!(mid > bound && mid < hi)) break;  // no float strictly between (or a NaN)
    int64_t count = 0;
    int64_t j = pat.width[0] - 1;
    for (int64_t i = 0; i < pat.k_sub && j >= 0; ++i) {
      j = std::min<int64_t>(j, pat.width[i] - 1);  // widths do not grow with i
      while (j >= 0 && v1[i] + v2[j] < mid) --j;
      count += j + 1;
      if (count >= k) break;
    }
    if (count >= k) bound = mid; else hi = mid;
  }
  return bound;
}

void topk_rows_f32(const float* s1, const float* s2, int64_t n, int64_t k, const Pattern& pat, int64_t begin,
                   int64_t end, int64_t* ids, float* vals) {
  const int64_t m = pat.k_sub, total = pat.size();
  std::vector<uint64_t> keys(2 * n);
  std::vector<int32_t> o1(m), o2(m), pos_i(total), pos_j(total);
  std::vector<float> v1(m), v2(m), sums(total);
  std::vector<uint32_t> key(total), tmp(total);
  for (int64_t r = begin; r < end; ++r) {
    sort_half(s1 + r * n, n, m, keys, o1, v1);
    sort_half(s2 + r * n, n, m, keys, o2, v2);
    float bound = v1[0] + v2[pat.corner[0] - 1];
    for (size_t i = 1; i < pat.corner.size(); ++i) bound = std::min(bound, v1[i] + v2[pat.corner[i] - 1]);
    bound = raise_bound(v1.data(), v2.data(), pat, k, bound);
    int64_t total_kept = 0;
    for (int64_t i = 0; i < m; ++i) {
      const float vi = v1[i];
      const int32_t w = pat.width[i];
      if (vi + v2[0] < bound) break;  // rows are sorted: no later row reaches the bound either
      for (int32_t j = 0; j < w; ++j) {
        const float sum = vi + v2[j];  // the torch form's float add
        if (sum < bound) break;  // v2 is sorted: the rest of the row is below too
        sums[total_kept] = sum;
        key[total_kept] = ordered(sum);
        pos_i[total_kept] = static_cast<int32_t>(i);
        pos_j[total_kept++] = j;
      }
    }
    int64_t need;
    const uint32_t prefix = kth_largest_key(key.data(), total_kept, k, &need, tmp);
    int64_t out = r * k;
    for (int64_t p = 0; p < total_kept; ++p) {
      if (key[p] > prefix || (key[p] == prefix && need-- > 0)) {
        ids[out] = static_cast<int64_t>(o1[pos_i[p]]) * n + o2[pos_j[p]];
        vals[out++] = sums[p];
      }
    }
  }
}

template <typename scalar_t>
void topk_rows_generic(const scalar_t* s1, const scalar_t* s2, int64_t n, int64_t k, const Pattern& pat,
                       int64_t begin, int64_t end, int64_t* ids, scalar_t* vals) {
  const int64_t m = pat.k_sub, total = pat.size();
  std::vector<int32_t> o1(n), o2(n), sel(total);
  std::vector<scalar_t> sums(total);
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* a = s1 + r * n;
    const scalar_t* b = s2 + r * n;
    for (int64_t t = 0; t < n; ++t) o1[t] = o2[t] = static_cast<int32_t>(t);
    auto by = [](const scalar_t* v) {
      return [v](int32_t x, int32_t y) { return v[x] > v[y] || (v[x] == v[y] && x < y); };
    };
    std::partial_sort(o1.begin(), o1.begin() + m, o1.end(), by(a));
    std::partial_sort(o2.begin(), o2.begin() + m, o2.end(), by(b));
    for (int64_t p = 0; p < total; ++p) {
      sums[p] = a[o1[pat.pi[p]]] + b[o2[pat.pj[p]]];
      sel[p] = static_cast<int32_t>(p);
    }
    if (k < total) std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), by(sums.data()));
    for (int64_t o = 0; o < k; ++o) {
      ids[r * k + o] = static_cast<int64_t>(o1[pat.pi[sel[o]]]) * n + o2[pat.pj[sel[o]]];
      vals[r * k + o] = sums[sel[o]];
    }
  }
}


// ---- re-ranking: the candidates' exact pre-activations and the k largest of them ----------------------

// Dot products on 32-byte vectors (8 floats, 4 doubles) written with the GCC / Clang vector extension,
// which -march=native lowers to this CPU's AVX-512 / AVX2 / SSE / NEON. Two or four independent
// accumulators and one horizontal sum per dot: an `omp simd reduction` loop spilled its accumulator to
// the stack every iteration and ran 2-2.5x slower at d 32-128.
template <typename scalar_t>
struct Lanes {
  typedef scalar_t vec __attribute__((vector_size(32)));
  static constexpr int64_t n = 32 / static_cast<int64_t>(sizeof(scalar_t));
};

template <typename scalar_t>
inline typename Lanes<scalar_t>::vec load(const scalar_t* p) {
  typename Lanes<scalar_t>::vec v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

template <typename scalar_t>
inline scalar_t lane_sum(typename Lanes<scalar_t>::vec v) {
  scalar_t s = 0;
  for (int64_t j = 0; j < Lanes<scalar_t>::n; ++j) s += v[j];
  return s;
}

// a · b over d entries
template <typename scalar_t>
inline scalar_t dot_row(const scalar_t* a, const scalar_t* b, int64_t d) {
  constexpr int64_t L = Lanes<scalar_t>::n;
  typename Lanes<scalar_t>::vec acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= d; i += 2 * L) {
    acc0 += load(a + i) * load(b + i);
    acc1 += load(a + i + L) * load(b + i + L);
  }
  for (; i + L <= d; i += L) acc0 += load(a + i) * load(b + i);
  scalar_t s = lane_sum<scalar_t>(acc0 + acc1);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// out[0..4) = x · r[0..4): one load of x feeds four accumulators (the rows of a matrix-vector product)
template <typename scalar_t>
inline void dot4(const scalar_t* x, const scalar_t* const r[4], int64_t d, scalar_t* out) {
  constexpr int64_t L = Lanes<scalar_t>::n;
  typename Lanes<scalar_t>::vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + L <= d; i += L) {
    const auto xv = load(x + i);
    a0 += xv * load(r[0] + i);
    a1 += xv * load(r[1] + i);
    a2 += xv * load(r[2] + i);
    a3 += xv * load(r[3] + i);
  }
  scalar_t s[4] = {lane_sum<scalar_t>(a0), lane_sum<scalar_t>(a1), lane_sum<scalar_t>(a2), lane_sum<scalar_t>(a3)};
  for (; i < d; ++i)
    for (int j = 0; j < 4; ++j) s[j] += x[i] * r[j][i];
  for (int j = 0; j < 4; ++j) out[j] = s[j];
}

// out[r] = x · w[r] for the c consecutive rows of w (d entries each): a matrix-vector product
template <typename scalar_t>
inline void matvec(const scalar_t* w, const scalar_t* x, int64_t c, int64_t d, scalar_t* out) {
  int64_t r = 0;
  for (; r + 4 <= c; r += 4) {
    const scalar_t* rows[4] = {w + r * d, w + (r + 1) * d, w + (r + 2) * d, w + (r + 3) * d};
    dot4(x, rows, d, out + r);
  }
  for (; r < c; ++r) out[r] = dot_row(w + r * d, x, d);
}

constexpr int64_t kPrefetch = 8;  // rows prefetched ahead (4, 8, 16 alike; none: 12 % slower at d 128, C 256)

struct SelectScratch {
  std::vector<uint32_t> key, tmp;
  std::vector<int64_t> order;
};

// Rows at least this long are read four at a time (dot4: four streams from memory at once). Measured on
// one core from a table far out of cache, us per token for 256 rows: d 768 75 (four) vs 130 (one); d 64
// and 128, 18 vs 13: short rows go one at a time.
constexpr int64_t kFourRowsFrom = 256;

// out[p] = w[ids[p]]·x + b[ids[p]] for the c candidate rows of one token; the rows are random reads of a
// table far larger than the cache, so each is prefetched kPrefetch rows ahead. Returns false if an id
// lies outside [0, n) (then no row is read and out is zero).
template <typename scalar_t>
bool candidate_preacts(const scalar_t* x, const scalar_t* w, const scalar_t* b, const int64_t* ids, int64_t c,
                       int64_t d, int64_t n, scalar_t* out) {
  for (int64_t p = 0; p < c; ++p)
    if (ids[p] < 0 || ids[p] >= n) {
      std::fill(out, out + c, scalar_t(0));
      return false;
    }
  auto prefetch = [&](int64_t p) {
    if (p < c)
      for (int64_t o = 0; o < d; o += 64 / static_cast<int64_t>(sizeof(scalar_t))) __builtin_prefetch(w + ids[p] * d + o);
  };
  int64_t p = 0;
  if (d >= kFourRowsFrom) {
    for (int64_t q = 0; q < std::min(kPrefetch, c); ++q) prefetch(q);
    for (; p + 4 <= c; p += 4) {
      for (int64_t j = 0; j < 4; ++j) prefetch(p + kPrefetch + j);
      const scalar_t* rows[4] = {w + ids[p] * d, w + ids[p + 1] * d, w + ids[p + 2] * d, w + ids[p + 3] * d};
      dot4(x, rows, d, out + p);
      for (int64_t j = 0; j < 4; ++j) out[p + j] += b ? b[ids[p + j]] : scalar_t(0);
    }
  }
  for (; p < c; ++p) {
    prefetch(p + kPrefetch);
    out[p] = dot_row(x, w + ids[p] * d, d) + (b ? b[ids[p]] : scalar_t(0));
  }
  return true;
}

// y += a * row (a pragma cannot sit inside AT_DISPATCH's macro argument, hence a function)
template <typename scalar_t>
inline void add_scaled(scalar_t* y, scalar_t a, const scalar_t* row, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] += a * row[j];
}

// positions of the k largest of v[0..c) (ties: lower position first), written to out: float32 by an
// MSD radix select on order-preserving keys
void top_positions(const float* v, int64_t c, int64_t k, SelectScratch& scratch, int64_t* out) {
  std::vector<uint32_t>& key = scratch.key;
  key.resize(c);
  for (int64_t p = 0; p < c; ++p) key[p] = ordered(v[p]);
  int64_t need;
  const uint32_t prefix = kth_largest_key(key.data(), c, k, &need, scratch.tmp);
  int64_t o = 0;
  for (int64_t p = 0; p < c; ++p)
    if (key[p] > prefix || (key[p] == prefix && need-- > 0)) out[o++] = p;
}

// float64 (the tests' reference dtype): the standard library's selection
void top_positions(const double* v, int64_t c, int64_t k, SelectScratch& scratch, int64_t* out) {
  std::vector<int64_t>& order = scratch.order;
  order.resize(c);
  for (int64_t p = 0; p < c; ++p) order[p] = p;
  auto before = [v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
  if (k < c) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
  std::copy(order.begin(), order.begin() + k, out);
}

// The pattern for (k, n), built once per process (decoding calls the search once per token and layer).
const Pattern& pattern_for(int64_t k, int64_t n) {
  static std::mutex lock;
  static std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Pattern>> cache;
  std::lock_guard<std::mutex> guard(lock);
  auto& slot = cache[{k, n}];
  if (!slot) slot = std::make_unique<Pattern>(k, n);
  return *slot;
}

// one search per row: float32 by radix, float64 by the standard library
void search_rows(const float* s1, const float* s2, int64_t n, int64_t k, const Pattern& pat, int64_t begin,
                 int64_t end, int64_t* ids, float* vals) {
  topk_rows_f32(s1, s2, n, k, pat, begin, end, ids, vals);
}
void search_rows(const double* s1, const double* s2, int64_t n, int64_t k, const Pattern& pat, int64_t begin,
                 int64_t end, int64_t* ids, double* vals) {
  topk_rows_generic(s1, s2, n, k, pat, begin, end, ids, vals);
}

}  // namespace

// s1, s2: (R, n) float32 / float64 on the CPU -> (R, k) int64 unit ids a*n + b and their sums.
std::vector<torch::Tensor> product_topk(torch::Tensor s1, torch::Tensor s2, int64_t k) {
  TORCH_CHECK(s1.device().is_cpu() && s2.device().is_cpu(), "product_topk: CPU tensors only");
  TORCH_CHECK(s1.dim() == 2 && s1.sizes() == s2.sizes(), "product_topk: s1 and s2 must be (rows, n) alike");
  TORCH_CHECK(s1.scalar_type() == s2.scalar_type(), "product_topk: s1 and s2 must share a dtype");
  const int64_t rows = s1.size(0), n = s1.size(1);
  TORCH_CHECK(n >= 1 && n < (1 << 20) && k >= 1 && k <= n * n, "product_topk: need 1 <= k <= n*n");
  auto a = s1.contiguous(), b = s2.contiguous();
  auto ids = torch::empty({rows, k}, a.options().dtype(torch::kInt64));
  auto vals = torch::empty({rows, k}, a.options());
  const Pattern& pat = pattern_for(k, n);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "product_topk", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    int64_t* pi = ids.data_ptr<int64_t>();
    scalar_t* pv = vals.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) { search_rows(pa, pb, n, k, pat, begin, end, pi, pv); });
  });
  return {ids, vals};
}

// x (T, d), w (N, d), b (N,) or an empty tensor, cand (T, C) int64 unit ids -> pre (T, C) = w[cand]·x + b[cand]
// and (T, k) int64 positions in cand of the k largest pre-activations per row (in no particular order).
std::vector<torch::Tensor> rerank(torch::Tensor x, torch::Tensor w, torch::Tensor b, torch::Tensor cand, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && cand.device().is_cpu(), "rerank: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rerank: x (T, d) and w (N, d)");
  TORCH_CHECK(cand.dim() == 2 && cand.size(0) == x.size(0) && cand.scalar_type() == torch::kInt64,
              "rerank: cand must be (T, C) int64");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rerank: x and w must share a dtype");
  const bool has_bias = b.numel() > 0;
  TORCH_CHECK(!has_bias || (b.dim() == 1 && b.size(0) == w.size(0) && b.scalar_type() == w.scalar_type()),
              "rerank: b must be (N,) like w");
  const int64_t t_rows = x.size(0), d = x.size(1), n = w.size(0), c = cand.size(1);
  TORCH_CHECK(k >= 1 && k <= c, "rerank: need 1 <= k <= C");
  auto xc = x.contiguous(), wc = w.contiguous(), bc = b.contiguous(), cc = cand.contiguous();
  auto pre = torch::empty({t_rows, c}, xc.options());
  auto pick = torch::empty({t_rows, k}, cc.options());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "rerank", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    const scalar_t* pw = wc.data_ptr<scalar_t>();
    const scalar_t* pb = has_bias ? bc.data_ptr<scalar_t>() : nullptr;
    const int64_t* pc = cc.data_ptr<int64_t>();
    scalar_t* pp = pre.data_ptr<scalar_t>();
    int64_t* pk = pick.data_ptr<int64_t>();
    at::parallel_for(0, t_rows, 8, [&](int64_t begin, int64_t end) {
      SelectScratch scratch;
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* xt = px + t * d;
        scalar_t* out = pp + t * c;
        if (!candidate_preacts(xt, pw, pb, pc + t * c, c, d, n, out)) bad = true;
        top_positions(out, c, k, scratch, pk + t * k);
      }
    });
  });
  TORCH_CHECK(!bad, "rerank: a candidate id is outside the table [0, N)");
  return {pre, pick};
}

// The whole re-ranking layer at inference, per token (eval mode, no gradient, no hooks: what decoding
// runs), in place of ~45 small torch ops whose fixed costs dominate at one token:
//   q = Wq x; q = (q - mean) / sqrt(var + eps) (query BatchNorm's running statistics, if given);
//   s1 = scale * cos(q1, K1), s2 = scale * cos(q2, K2); the exact top C of s1[a] + s2[b] (as product_topk);
//   their pre-activations w_in[u]·x + b[u] and the k largest (as rerank); h = relu(pre);
//   y = sum h_i w_out[u_i].
// x (T, d), wq (D, d), bn_mean / bn_var (D,) or empty, keys (2, n, D/2), w_in / w_out (N, d), b_in (N,) or
// empty -> y (T, d), units (T, k) int64, h (T, k).
std::vector<torch::Tensor> rerank_infer(torch::Tensor x, torch::Tensor wq, torch::Tensor bn_mean, torch::Tensor bn_var,
                                        double bn_eps, torch::Tensor keys, double scale, torch::Tensor w_in,
                                        torch::Tensor b_in, torch::Tensor w_out, int64_t candidates, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && wq.dim() == 2 && wq.size(1) == x.size(1) && wq.size(0) % 2 == 0,
              "rerank_infer: x (T, d), wq (D, d) with D even");
  TORCH_CHECK(keys.dim() == 3 && keys.size(0) == 2 && keys.size(2) * 2 == wq.size(0), "rerank_infer: keys (2, n, D/2)");
  const int64_t t_rows = x.size(0), d = x.size(1), dq = wq.size(0), half = dq / 2, n = keys.size(1);
  const int64_t units_n = w_in.size(0);
  TORCH_CHECK(units_n == n * n && w_in.sizes() == w_out.sizes() && w_in.size(1) == d, "rerank_infer: w_in, w_out (n^2, d)");
  TORCH_CHECK(candidates >= 1 && candidates <= units_n && k >= 1 && k <= candidates, "rerank_infer: 1 <= k <= C <= N");
  const bool has_bn = bn_mean.numel() > 0, has_bias = b_in.numel() > 0;
  for (const auto& t : {wq, bn_mean, bn_var, keys, w_in, b_in, w_out})
    TORCH_CHECK(t.numel() == 0 || (t.device().is_cpu() && t.scalar_type() == x.scalar_type()),
                "rerank_infer: CPU tensors of one dtype");
  auto xc = x.contiguous(), wqc = wq.contiguous(), kc = keys.contiguous(), wic = w_in.contiguous(),
       woc = w_out.contiguous(), bc = b_in.contiguous(), mc = bn_mean.contiguous(), vc = bn_var.contiguous();
  auto y = torch::zeros({t_rows, d}, xc.options());
  auto units = torch::empty({t_rows, k}, xc.options().dtype(torch::kInt64));
  auto h = torch::empty({t_rows, k}, xc.options());
  const Pattern& pat = pattern_for(candidates, n);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "rerank_infer", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    const scalar_t* pq = wqc.data_ptr<scalar_t>();
    const scalar_t* pm = has_bn ? mc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pv = has_bn ? vc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pk = kc.data_ptr<scalar_t>();
    const scalar_t* pwi = wic.data_ptr<scalar_t>();
    const scalar_t* pb = has_bias ? bc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pwo = woc.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    int64_t* pu = units.data_ptr<int64_t>();
    scalar_t* ph = h.data_ptr<scalar_t>();
    // the sub-keys, each row L2-normalised (F.normalize: x / max(|x|, 1e-12)), once per call
    std::vector<scalar_t> kn(2 * n * half);
    for (int64_t r = 0; r < 2 * n; ++r) {
      const scalar_t* row = pk + r * half;
      const scalar_t norm = std::max<scalar_t>(std::sqrt(dot_row(row, row, half)), scalar_t(1e-12));
      for (int64_t i = 0; i < half; ++i) kn[r * half + i] = row[i] / norm;
    }
    // BatchNorm's 1 / sqrt(var + eps), once per call
    std::vector<scalar_t> inv_std(has_bn ? dq : 0);
    for (int64_t c = 0; c < static_cast<int64_t>(inv_std.size()); ++c)
      inv_std[c] = scalar_t(1) / std::sqrt(pv[c] + static_cast<scalar_t>(bn_eps));
    at::parallel_for(0, t_rows, 8, [&](int64_t begin, int64_t end) {
      const int64_t rows = end - begin;
      std::vector<scalar_t> q(dq), s1(rows * n), s2(rows * n), sums(rows * candidates), pre(candidates);
      std::vector<int64_t> cand(rows * candidates), top(k);
      SelectScratch scratch;
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* xt = px + (begin + r) * d;
        matvec(pq, xt, dq, d, q.data());
        if (has_bn)
          for (int64_t c = 0; c < dq; ++c) q[c] = (q[c] - pm[c]) * inv_std[c];
        for (int side = 0; side < 2; ++side) {
          const scalar_t* qh = q.data() + side * half;
          const scalar_t norm = std::max<scalar_t>(std::sqrt(dot_row(qh, qh, half)), scalar_t(1e-12));
          scalar_t* out = (side ? s2.data() : s1.data()) + r * n;
          matvec(kn.data() + side * n * half, qh, n, half, out);
          for (int64_t a = 0; a < n; ++a) out[a] = static_cast<scalar_t>(scale) * (out[a] / norm);
        }
      }
      search_rows(s1.data(), s2.data(), n, candidates, pat, 0, rows, cand.data(), sums.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = begin + r;
        const scalar_t* xt = px + t * d;
        const int64_t* ct = cand.data() + r * candidates;
        candidate_preacts(xt, pwi, pb, ct, candidates, d, units_n, pre.data());  // ids from the search: in range
        top_positions(pre.data(), candidates, k, scratch, top.data());
        scalar_t* yt = py + t * d;
        for (int64_t i = 0; i < k; ++i)  // the output rows are random reads too
          for (int64_t o = 0; o < d; o += 64 / static_cast<int64_t>(sizeof(scalar_t)))
            __builtin_prefetch(pwo + ct[top[i]] * d + o);
        for (int64_t i = 0; i < k; ++i) {
          const int64_t u = ct[top[i]];
          const scalar_t hv = std::max<scalar_t>(pre[top[i]], scalar_t(0));
          pu[t * k + i] = u;
          ph[t * k + i] = hv;
          if (hv != 0) {
            add_scaled(yt, hv, pwo + u * d, d);
          }
        }
      }
    });
  });
  return {y, units, h};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("product_topk", &product_topk, "exact top-k of all pair sums s1[a] + s2[b], per row (CPU)");
  m.def("rerank_infer", &rerank_infer, "the re-ranking layer at inference, fused per token (CPU)");
  m.def("rerank", &rerank, "candidates' pre-activations and the positions of the k largest, per row (CPU)");
}
