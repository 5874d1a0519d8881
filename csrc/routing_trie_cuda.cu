// CUDA routing-trie update: one sort-based pass per depth (breadth first), then a merge of that
// level into the existing trie by binary search. Same output as routing_trie_cpu.cpp.
//
// Items are the live sub-paths, one per (token n, start layer s), held as the flat index
// row = n*L + s into `paths` plus the batch node they reached at the previous depth. At depth d:
//   1. key = (parent batch node << expert_bits) | expert at layer s+d-1, radix-sorted over only
//      the bits in use (stable, so equal keys keep token order);
//   2. runs of equal keys are the batch's depth-d nodes: count = run length, reward_sum = run sum
//      (float64; a thread sums a chunk of consecutive items and adds one partial per run it
//      touches, so atomics are few and most runs are summed in one fixed order);
//   3. the batch level and the existing level, both sorted by (merged parent index, expert), are
//      merged: lower_bound of each side in the other gives every node its merged position;
//   4. sub-paths that go on (no -1 next, inside max_depth and the layer count) are compacted, in
//      order, into the next depth's items, already sorted by their new parent.
// Everything is on the device except three scalars per depth (run count, matches, survivors).
//
// Value checks (issue 28: any code can call the registered op): expert ids in `paths` outside
// [-1, num_experts) and trie nodes that break the invariants of routing_trie.h are counted into a
// device flag (`flags`: [0] bad path entries, [1] bad trie nodes) by kernels that clamp whatever
// they index with, so nothing reads or writes out of bounds. The flag is copied to the host in the
// same copy as a scalar the update reads anyway (the depth-1 item count for paths, each level's match
// count for the trie), so the checks cost no extra host sync. A failed check stops the update there,
// before any kernel uses the bad values to index or write, and is returned in a CudaUpdateResult:
// nothing in this file throws for bad input (routing_update_cuda, host-compiled, raises). Counts
// saturate at INT64_MAX (saturating_add).
#include "routing_trie.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>

#include <algorithm>
#include <utility>
#include <vector>

namespace memtrace {
namespace {

constexpr int kThreads = 256;
constexpr int kRewardChunk = 16;

inline unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, (n + kThreads - 1) / kThreads)); }

inline int bits_for(int64_t max_value) {  // bits to hold 0..max_value
  int b = 1;
  while (b < 63 && (int64_t(1) << b) <= max_value) ++b;
  return b;
}

// Counts entries of P outside [-1, num_experts) into flags[0].
__global__ void check_paths_kernel(const int64_t* __restrict__ P, int64_t n, int64_t num_experts,
                                   unsigned long long* __restrict__ flags) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t v = P[i];
  if (v < -1 || v >= num_experts) atomicAdd(flags, 1ULL);
}

// Depth-1 items: every (s, n) whose first expert is routed, s-major so that items are sorted by
// their parent (the start layer) and by token inside it.
__global__ void seed_flags_kernel(const int64_t* __restrict__ P, int64_t N, int64_t L, int64_t num_starts,
                                  int32_t* __restrict__ flag) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N * num_starts) return;
  const int64_t s = i / N, n = i - s * N;
  flag[i] = P[n * L + s] >= 0;
}

__global__ void seed_items_kernel(const int32_t* __restrict__ flag, const int64_t* __restrict__ pos, int64_t N,
                                  int64_t L, int64_t num_starts, int64_t* __restrict__ rows,
                                  int64_t* __restrict__ grp) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N * num_starts || !flag[i]) return;
  const int64_t s = i / N, n = i - s * N, at = pos[i] - 1;
  rows[at] = n * L + s;
  grp[at] = s;
}

__global__ void keys_kernel(const int64_t* __restrict__ P, const int64_t* __restrict__ rows,
                            const int64_t* __restrict__ grp, int64_t m, int64_t d, int expert_bits,
                            uint64_t* __restrict__ keys) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= m) return;
  keys[i] = (static_cast<uint64_t>(grp[i]) << expert_bits) | static_cast<uint64_t>(P[rows[i] + d - 1]);
}

__global__ void heads_kernel(const uint64_t* __restrict__ keys, int64_t m, int32_t* __restrict__ head) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= m) return;
  head[i] = i == 0 || keys[i] != keys[i - 1];
}

// One batch node per run: parent, expert, first item.
__global__ void runs_kernel(const uint64_t* __restrict__ keys, const int32_t* __restrict__ head,
                            const int64_t* __restrict__ seg, int64_t m, int expert_bits,
                            int64_t* __restrict__ b_parent, int16_t* __restrict__ b_expert,
                            int64_t* __restrict__ b_first) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= m || !head[i]) return;
  const int64_t j = seg[i];
  b_parent[j] = static_cast<int64_t>(keys[i] >> expert_bits);
  b_expert[j] = static_cast<int16_t>(keys[i] & ((uint64_t(1) << expert_bits) - 1));
  b_first[j] = i;
}

__global__ void run_counts_kernel(const int64_t* __restrict__ b_first, int64_t nb, int64_t m,
                                  int64_t* __restrict__ b_count) {
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= nb) return;
  b_count[j] = (j + 1 < nb ? b_first[j + 1] : m) - b_first[j];
}

__global__ void run_rewards_kernel(const int64_t* __restrict__ seg, const int64_t* __restrict__ rows,
                                   const double* __restrict__ R, int64_t L, int64_t m,
                                   double* __restrict__ b_reward) {
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t begin = t * kRewardChunk;
  if (begin >= m) return;
  const int64_t end = min(begin + kRewardChunk, m);
  int64_t cur = seg[begin];
  double acc = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t s = seg[i];
    if (s != cur) {
      atomicAdd(b_reward + cur, acc);
      acc = 0.0;
      cur = s;
    }
    acc += R[rows[i] / L];
  }
  atomicAdd(b_reward + cur, acc);
}

// Level keys (merged parent index << 16 | expert); `remap` maps previous-level indices to merged
// ones (null at depth 1, where the parent is the start layer). With `flags` (the existing trie's
// nodes), a node whose parent is outside [0, num_parents), whose expert is outside
// [0, num_experts) or whose count is negative is counted into *flags and gets key 0 without
// reading `remap` (with num_parents == 0 even index 0 would be out of bounds); the update stops
// before the keys are used to write.
template <typename ParentT>
__global__ void level_keys_kernel(const ParentT* __restrict__ parent, const int16_t* __restrict__ expert,
                                  const int64_t* __restrict__ remap, int64_t n, int64_t* __restrict__ keys,
                                  const int64_t* __restrict__ count, int64_t num_parents, int64_t num_experts,
                                  unsigned long long* __restrict__ flags) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  int64_t p = static_cast<int64_t>(parent[i]);
  int64_t e = static_cast<int64_t>(expert[i]);
  if (flags && (p < 0 || p >= num_parents || e < 0 || e >= num_experts || count[i] < 0)) {
    atomicAdd(flags, 1ULL);
    keys[i] = 0;
    return;
  }
  keys[i] = ((remap ? remap[p] : p) << kExpertBits) | e;
}

// Counts the places where a level's keys are not strictly increasing into *flags.
__global__ void check_sorted_kernel(const int64_t* __restrict__ keys, int64_t n,
                                    unsigned long long* __restrict__ flags) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i == 0 || i >= n) return;
  if (keys[i] <= keys[i - 1]) atomicAdd(flags, 1ULL);
}

__global__ void lower_bound_kernel(const int64_t* __restrict__ hay, int64_t nh, const int64_t* __restrict__ needle,
                                   int64_t nn, int64_t* __restrict__ lb, int32_t* __restrict__ match) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= nn) return;
  const int64_t x = needle[i];
  int64_t lo = 0, hi = nh;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (hay[mid] < x) lo = mid + 1; else hi = mid;
  }
  lb[i] = lo;
  if (match) match[i] = lo < nh && hay[lo] == x;
}

// Existing nodes: position = own index + batch keys before it - matches before it.
__global__ void scatter_old_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ lb,
                                   const int32_t* __restrict__ match, const int64_t* __restrict__ cum_match,
                                   const int64_t* __restrict__ cnt, const double* __restrict__ rew,
                                   const int32_t* __restrict__ fst, const int32_t* __restrict__ lst, int64_t n,
                                   int64_t* __restrict__ pos, int32_t* __restrict__ o_par, int16_t* __restrict__ o_exp,
                                   int64_t* __restrict__ o_cnt, double* __restrict__ o_rew,
                                   int32_t* __restrict__ o_fst, int32_t* __restrict__ o_lst) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t p = i + lb[i] - (cum_match[i] - match[i]);
  pos[i] = p;
  o_par[p] = static_cast<int32_t>(keys[i] >> kExpertBits);
  o_exp[p] = static_cast<int16_t>(keys[i] & ((1 << kExpertBits) - 1));
  o_cnt[p] = cnt[i];
  o_rew[p] = rew[i];
  o_fst[p] = fst[i];
  o_lst[p] = lst[i];
}

// Batch nodes: a match adds into the existing node's slot (written by scatter_old before this
// kernel on the same stream); a new node is written whole.
__global__ void scatter_new_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ lb,
                                   const int64_t* __restrict__ old_keys, int64_t n_old,
                                   const int64_t* __restrict__ cum_match, const int64_t* __restrict__ cnt,
                                   const double* __restrict__ rew, int32_t step, int64_t n,
                                   int64_t* __restrict__ pos, int32_t* __restrict__ o_par,
                                   int16_t* __restrict__ o_exp, int64_t* __restrict__ o_cnt,
                                   double* __restrict__ o_rew, int32_t* __restrict__ o_fst,
                                   int32_t* __restrict__ o_lst) {
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int64_t k = lb[j];
  const int64_t p = j + k - (k > 0 ? cum_match[k - 1] : 0);
  pos[j] = p;
  if (k < n_old && old_keys[k] == keys[j]) {
    o_cnt[p] = saturating_add(o_cnt[p], cnt[j]);
    o_rew[p] += rew[j];
    o_lst[p] = step;
  } else {
    o_par[p] = static_cast<int32_t>(keys[j] >> kExpertBits);
    o_exp[p] = static_cast<int16_t>(keys[j] & ((1 << kExpertBits) - 1));
    o_cnt[p] = cnt[j];
    o_rew[p] = rew[j];
    o_fst[p] = step;
    o_lst[p] = step;
  }
}

__global__ void next_flags_kernel(const int64_t* __restrict__ P, const int64_t* __restrict__ rows, int64_t m,
                                  int64_t L, int64_t d, int64_t max_depth, int32_t* __restrict__ flag) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= m) return;
  const int64_t row = rows[i];
  flag[i] = d < max_depth && (row % L) + d < L && P[row + d] >= 0;
}

__global__ void next_items_kernel(const int32_t* __restrict__ flag, const int64_t* __restrict__ pos,
                                  const int64_t* __restrict__ rows, const int64_t* __restrict__ seg, int64_t m,
                                  int64_t* __restrict__ next_rows, int64_t* __restrict__ next_grp) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= m || !flag[i]) return;
  const int64_t at = pos[i] - 1;
  next_rows[at] = rows[i];
  next_grp[at] = seg[i];
}

inline int64_t last_value(const at::Tensor& t) { return t.numel() ? t[t.numel() - 1].item<int64_t>() : 0; }

// last_value(t) of an int64 tensor and flags[which], in one device-to-host copy (the sync last_value
// pays anyway). The callers pass a non-empty t; an empty one reads as 0 rather than narrowing at -1.
inline std::pair<int64_t, int64_t> last_value_and_flag(const at::Tensor& t, const at::Tensor& flags, int64_t which) {
  const at::Tensor flag = flags.narrow(0, which, 1);
  if (t.numel() == 0) return {0, flag.item<int64_t>()};
  const at::Tensor both = at::cat({t.narrow(0, t.numel() - 1, 1), flag}).cpu();
  return {both.data_ptr<int64_t>()[0], both.data_ptr<int64_t>()[1]};
}

// An early return may leave kernels queued that use this call's temporaries. That is safe: all of
// them run on the current stream, and the caching allocator hands a freed block only to work queued
// after it on that stream.
CudaUpdateResult failed(CudaUpdateResult::Error error, int64_t bad, int64_t depth) {
  CudaUpdateResult r;
  r.error = error;
  r.bad = bad;
  r.depth = depth;
  return r;
}

}  // namespace

CudaUpdateResult routing_update_cuda_run(const at::Tensor& parent, const at::Tensor& expert,
                                         const at::Tensor& count, const at::Tensor& reward_sum,
                                         const at::Tensor& first_seen, const at::Tensor& last_seen,
                                         at::IntArrayRef level_sizes, const at::Tensor& paths_in,
                                         const at::Tensor& rewards_in, int64_t step, int64_t max_depth,
                                         int64_t num_experts, bool suffix) {
  // routing_update_cuda (routing_trie_cpu.cpp) has run check_update_args and the size checks.
  const c10::cuda::CUDAGuard guard(paths_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor paths = paths_in.contiguous();
  const at::Tensor rewards = rewards_in.contiguous();
  const int64_t N = paths.size(0), L = paths.size(1);
  const int64_t num_starts = num_start_layers(L, suffix);
  const int64_t* P = paths.data_ptr<int64_t>();
  const double* R = rewards.data_ptr<double>();
  const int32_t step32 = static_cast<int32_t>(step);
  const int expert_bits = bits_for(num_experts - 1);
  auto opts = paths.options();
  auto i32 = opts.dtype(at::kInt), i64 = opts.dtype(at::kLong);
  // [0]: path entries outside [-1, num_experts); [1]: trie nodes that break routing_trie.h's invariants
  at::Tensor flags = at::zeros({2}, i64);
  auto* bad_paths = reinterpret_cast<unsigned long long*>(flags.data_ptr<int64_t>());
  auto* bad_nodes = bad_paths + 1;

  // Depth-1 items.
  at::Tensor rows, grp;
  {
    const int64_t total = N * num_starts;
    at::Tensor flag = at::empty({total}, i32);
    if (N * L > 0) check_paths_kernel<<<grid_for(N * L), kThreads, 0, stream>>>(P, N * L, num_experts, bad_paths);
    if (total) seed_flags_kernel<<<grid_for(total), kThreads, 0, stream>>>(P, N, L, num_starts, flag.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor pos = at::cumsum(flag, 0, at::kLong);
    int64_t m = 0;
    if (total) {
      const std::pair<int64_t, int64_t> read = last_value_and_flag(pos, flags, 0);
      if (read.second != 0) return failed(CudaUpdateResult::kBadPaths, read.second, 0);
      m = read.first;
    }
    rows = at::empty({m}, i64);
    grp = at::empty({m}, i64);
    if (total) seed_items_kernel<<<grid_for(total), kThreads, 0, stream>>>(
        flag.data_ptr<int32_t>(), pos.data_ptr<int64_t>(), N, L, num_starts, rows.data_ptr<int64_t>(),
        grp.data_ptr<int64_t>());
  }

  const int64_t old_depth = static_cast<int64_t>(level_sizes.size());
  std::vector<at::Tensor> out_par, out_exp, out_cnt, out_rew, out_fst, out_lst;
  std::vector<int64_t> out_sizes;
  at::Tensor remap_old, remap_new;  // previous level: existing / batch index -> merged index
  int64_t offset = 0, total_nodes = 0, num_parents = L;
  for (int64_t d = 1; rows.numel() > 0 || d <= old_depth; ++d) {
    const int64_t m = rows.numel();
    // ---- the batch's depth-d nodes
    at::Tensor b_parent = at::empty({0}, i64), b_expert = at::empty({0}, opts.dtype(at::kShort));
    at::Tensor b_count = at::empty({0}, i64), b_reward = at::empty({0}, opts.dtype(at::kDouble));
    at::Tensor seg, sorted_rows;
    int64_t nb = 0;
    if (m > 0) {
      at::Tensor keys = at::empty({m}, i64), keys_sorted = at::empty({m}, i64);
      sorted_rows = at::empty({m}, i64);
      auto* k_in = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
      auto* k_out = reinterpret_cast<uint64_t*>(keys_sorted.data_ptr<int64_t>());
      keys_kernel<<<grid_for(m), kThreads, 0, stream>>>(P, rows.data_ptr<int64_t>(), grp.data_ptr<int64_t>(), m, d,
                                                        expert_bits, k_in);
      const int end_bit = std::min(64, expert_bits + bits_for(std::max<int64_t>(num_parents - 1, 0)));
      size_t temp_bytes = 0;
      cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, k_in, k_out, rows.data_ptr<int64_t>(),
                                      sorted_rows.data_ptr<int64_t>(), static_cast<int>(m), 0, end_bit, stream);
      at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, opts.dtype(at::kByte));
      cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, k_in, k_out, rows.data_ptr<int64_t>(),
                                      sorted_rows.data_ptr<int64_t>(), static_cast<int>(m), 0, end_bit, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor head = at::empty({m}, i32);
      heads_kernel<<<grid_for(m), kThreads, 0, stream>>>(k_out, m, head.data_ptr<int32_t>());
      seg = at::cumsum(head, 0, at::kLong).sub_(1);
      nb = last_value(seg) + 1;
      b_parent = at::empty({nb}, i64);
      b_expert = at::empty({nb}, opts.dtype(at::kShort));
      at::Tensor b_first = at::empty({nb}, i64);
      runs_kernel<<<grid_for(m), kThreads, 0, stream>>>(k_out, head.data_ptr<int32_t>(), seg.data_ptr<int64_t>(), m,
                                                        expert_bits, b_parent.data_ptr<int64_t>(),
                                                        b_expert.data_ptr<int16_t>(), b_first.data_ptr<int64_t>());
      b_count = at::empty({nb}, i64);
      run_counts_kernel<<<grid_for(nb), kThreads, 0, stream>>>(b_first.data_ptr<int64_t>(), nb, m,
                                                               b_count.data_ptr<int64_t>());
      b_reward = at::zeros({nb}, opts.dtype(at::kDouble));
      run_rewards_kernel<<<grid_for((m + kRewardChunk - 1) / kRewardChunk), kThreads, 0, stream>>>(
          seg.data_ptr<int64_t>(), sorted_rows.data_ptr<int64_t>(), R, L, m, b_reward.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // ---- merge with the existing depth-d level
    const int64_t nt = d <= old_depth ? level_sizes[static_cast<size_t>(d - 1)] : 0;
    at::Tensor t_par = parent.narrow(0, offset, nt), t_exp = expert.narrow(0, offset, nt);
    at::Tensor kt = at::empty({nt}, i64), kb = at::empty({nb}, i64);
    const int64_t* r_old = d > 1 && remap_old.defined() ? remap_old.data_ptr<int64_t>() : nullptr;
    const int64_t* r_new = d > 1 && remap_new.defined() ? remap_new.data_ptr<int64_t>() : nullptr;
    // parents of the existing depth-d nodes index the existing depth d-1 level (depth 1: start layers)
    if (nt) {
      const int64_t t_parents = d == 1 ? L : level_sizes[static_cast<size_t>(d - 2)];
      level_keys_kernel<int32_t><<<grid_for(nt), kThreads, 0, stream>>>(
          t_par.data_ptr<int32_t>(), t_exp.data_ptr<int16_t>(), r_old, nt, kt.data_ptr<int64_t>(),
          count.data_ptr<int64_t>() + offset, t_parents, num_experts, bad_nodes);
      check_sorted_kernel<<<grid_for(nt), kThreads, 0, stream>>>(kt.data_ptr<int64_t>(), nt, bad_nodes);
    }
    if (nb) level_keys_kernel<int64_t><<<grid_for(nb), kThreads, 0, stream>>>(
        b_parent.data_ptr<int64_t>(), b_expert.data_ptr<int16_t>(), r_new, nb, kb.data_ptr<int64_t>(), nullptr, 0,
        0, nullptr);
    at::Tensor lb_t = at::empty({nt}, i64), match_t = at::empty({nt}, i32), lb_b = at::empty({nb}, i64);
    if (nt) lower_bound_kernel<<<grid_for(nt), kThreads, 0, stream>>>(
        kb.data_ptr<int64_t>(), nb, kt.data_ptr<int64_t>(), nt, lb_t.data_ptr<int64_t>(), match_t.data_ptr<int32_t>());
    if (nb) lower_bound_kernel<<<grid_for(nb), kThreads, 0, stream>>>(
        kt.data_ptr<int64_t>(), nt, kb.data_ptr<int64_t>(), nb, lb_b.data_ptr<int64_t>(), nullptr);
    at::Tensor cum_match = at::cumsum(match_t, 0, at::kLong);
    int64_t matches = 0;
    if (nt) {  // the trie's checks ride on this copy; nothing has been written from the level yet
      const std::pair<int64_t, int64_t> read = last_value_and_flag(cum_match, flags, 1);
      if (read.second != 0) return failed(CudaUpdateResult::kBadNodes, read.second, d);
      matches = read.first;
    }
    const int64_t nm = nt + nb - matches;
    total_nodes += nm;
    if (total_nodes > kMaxNodes) return failed(CudaUpdateResult::kTooManyNodes, 0, 0);
    at::Tensor o_par = at::empty({nm}, i32), o_exp = at::empty({nm}, opts.dtype(at::kShort));
    at::Tensor o_cnt = at::empty({nm}, i64), o_rew = at::empty({nm}, opts.dtype(at::kDouble));
    at::Tensor o_fst = at::empty({nm}, i32), o_lst = at::empty({nm}, i32);
    at::Tensor pos_old = at::empty({nt}, i64), pos_new = at::empty({nb}, i64);
    if (nt) scatter_old_kernel<<<grid_for(nt), kThreads, 0, stream>>>(
        kt.data_ptr<int64_t>(), lb_t.data_ptr<int64_t>(), match_t.data_ptr<int32_t>(), cum_match.data_ptr<int64_t>(),
        count.data_ptr<int64_t>() + offset, reward_sum.data_ptr<double>() + offset,
        first_seen.data_ptr<int32_t>() + offset, last_seen.data_ptr<int32_t>() + offset, nt,
        pos_old.data_ptr<int64_t>(), o_par.data_ptr<int32_t>(), o_exp.data_ptr<int16_t>(), o_cnt.data_ptr<int64_t>(),
        o_rew.data_ptr<double>(), o_fst.data_ptr<int32_t>(), o_lst.data_ptr<int32_t>());
    if (nb) scatter_new_kernel<<<grid_for(nb), kThreads, 0, stream>>>(
        kb.data_ptr<int64_t>(), lb_b.data_ptr<int64_t>(), kt.data_ptr<int64_t>(), nt, cum_match.data_ptr<int64_t>(),
        b_count.data_ptr<int64_t>(), b_reward.data_ptr<double>(), step32, nb, pos_new.data_ptr<int64_t>(),
        o_par.data_ptr<int32_t>(), o_exp.data_ptr<int16_t>(), o_cnt.data_ptr<int64_t>(), o_rew.data_ptr<double>(),
        o_fst.data_ptr<int32_t>(), o_lst.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out_par.push_back(o_par);
    out_exp.push_back(o_exp);
    out_cnt.push_back(o_cnt);
    out_rew.push_back(o_rew);
    out_fst.push_back(o_fst);
    out_lst.push_back(o_lst);
    out_sizes.push_back(nm);
    offset += nt;
    remap_old = pos_old;
    remap_new = pos_new;
    num_parents = nb;

    // ---- sub-paths that go on to depth d+1
    if (m > 0) {
      at::Tensor flag = at::empty({m}, i32);
      next_flags_kernel<<<grid_for(m), kThreads, 0, stream>>>(P, sorted_rows.data_ptr<int64_t>(), m, L, d, max_depth,
                                                              flag.data_ptr<int32_t>());
      at::Tensor pos = at::cumsum(flag, 0, at::kLong);
      const int64_t next = last_value(pos);
      at::Tensor next_rows = at::empty({next}, i64), next_grp = at::empty({next}, i64);
      if (next) next_items_kernel<<<grid_for(m), kThreads, 0, stream>>>(
          flag.data_ptr<int32_t>(), pos.data_ptr<int64_t>(), sorted_rows.data_ptr<int64_t>(), seg.data_ptr<int64_t>(),
          m, next_rows.data_ptr<int64_t>(), next_grp.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      rows = next_rows;
      grp = next_grp;
    }
  }

  auto cat = [&](std::vector<at::Tensor>& parts, at::ScalarType dt) {
    return parts.empty() ? at::empty({0}, opts.dtype(dt)) : at::cat(parts, 0);
  };
  at::Tensor sizes = at::empty({static_cast<int64_t>(out_sizes.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(out_sizes.begin(), out_sizes.end(), sizes.data_ptr<int64_t>());
  CudaUpdateResult done;
  done.arrays = TrieArrays{cat(out_par, at::kInt), cat(out_exp, at::kShort), cat(out_cnt, at::kLong),
                           cat(out_rew, at::kDouble), cat(out_fst, at::kInt), cat(out_lst, at::kInt), sizes};
  return done;
}

}  // namespace memtrace
