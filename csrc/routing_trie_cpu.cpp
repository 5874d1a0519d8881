// CPU routing-trie update: build the batch's trie depth-first (an MSD radix sort of the
// sub-paths whose digits are the experts), then merge it level by level into the existing trie.
//
// Building depth-first keeps every group of rows in increasing row order (the counting sorts are
// stable), so reads of `paths` walk forward through memory, and a group that shrinks to one row
// is emitted as a chain without further sorting: past the first few levels almost every row is
// alone, so most path-steps cost one read and one append.
#include "routing_trie.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace memtrace {

void check_update_args(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                       const at::Tensor& reward_sum, const at::Tensor& first_seen, const at::Tensor& last_seen,
                       at::IntArrayRef level_sizes, const at::Tensor& paths, const at::Tensor& rewards,
                       int64_t step, int64_t max_depth, int64_t num_experts) {
  TORCH_CHECK(parent.scalar_type() == at::kInt && expert.scalar_type() == at::kShort &&
                  count.scalar_type() == at::kLong && reward_sum.scalar_type() == at::kDouble &&
                  first_seen.scalar_type() == at::kInt && last_seen.scalar_type() == at::kInt,
              "routing_update: trie arrays must be int32, int16, int64, float64, int32, int32");
  TORCH_CHECK(paths.scalar_type() == at::kLong && paths.dim() == 2, "routing_update: paths must be int64 [N, L]");
  TORCH_CHECK(rewards.scalar_type() == at::kDouble && rewards.dim() == 1 && rewards.size(0) == paths.size(0),
              "routing_update: rewards must be float64 [N]");
  const int64_t n = parent.numel();
  for (const auto* t : {&parent, &expert, &count, &reward_sum, &first_seen, &last_seen}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == n && t->is_contiguous(),
                "routing_update: trie arrays must be contiguous 1-D tensors of one length");
    TORCH_CHECK(t->device() == paths.device(), "routing_update: trie arrays and paths must share a device");
  }
  TORCH_CHECK(rewards.device() == paths.device(), "routing_update: rewards and paths must share a device");
  int64_t total = 0;
  for (int64_t s : level_sizes) {
    TORCH_CHECK(s >= 0, "routing_update: negative level size");
    total += s;
  }
  TORCH_CHECK(total == n, "routing_update: level_sizes sum to ", total, " but the trie holds ", n, " nodes");
  TORCH_CHECK(step >= INT32_MIN && step <= INT32_MAX, "routing_update: step must fit in int32");
  TORCH_CHECK(max_depth >= 1 && max_depth <= 255, "routing_update: max_depth must be in [1, 255]");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "routing_update: num_experts must be in [1, 32767]");
}

namespace {

struct Level {  // one level of a trie, as plain vectors
  std::vector<int32_t> parent;
  std::vector<int16_t> expert;
  std::vector<int64_t> count;
  std::vector<double> reward;
  std::vector<int32_t> first, last;
  size_t size() const { return parent.size(); }
};

class BatchBuilder {
 public:
  BatchBuilder(const int64_t* paths, const double* rewards, int64_t L, int64_t max_depth, int64_t num_experts)
      : P_(paths), R_(rewards), L_(L), max_depth_(max_depth), E_(num_experts),
        levels_(static_cast<size_t>(max_depth)), bucket_(static_cast<size_t>(num_experts) + 2) {}

  // rows[i] is a token id; all rows start at layer s. Builds the sub-trie under root s.
  void build(std::vector<int32_t>& rows, int64_t s) {
    if (rows.empty()) return;
    if (!reserved_) {  // a level of one start block holds at most one node per row
      for (Level& lv : levels_) {
        lv.parent.reserve(rows.size());
        lv.expert.reserve(rows.size());
        lv.count.reserve(rows.size());
        lv.reward.reserve(rows.size());
      }
      reserved_ = true;
    }
    digit_.resize(rows.size());
    tmp_digit_.resize(rows.size());
    tmp_.resize(rows.size());
    rows_base_ = rows.data();
    group(rows.data(), static_cast<int64_t>(rows.size()), s, /*depth=*/1, /*parent=*/static_cast<int32_t>(s));
  }

  std::vector<Level>& levels() { return levels_; }

 private:
  // Expert id + 1 of row `tok` at depth d (1-based) below start s, 0 where the sub-path has ended.
  inline int64_t digit(int32_t tok, int64_t s, int64_t d) const {
    const int64_t layer = s + d - 1;
    if (d > max_depth_ || layer >= L_) return 0;
    return P_[static_cast<int64_t>(tok) * L_ + layer] + 1;  // -1 (cut) becomes 0
  }

  // Emit the rest of a single row's path as a chain of count-1 nodes.
  void chain(int32_t tok, int64_t s, int64_t d, int32_t parent) {
    const double r = R_[tok];
    for (;; ++d) {
      const int64_t e = digit(tok, s, d);
      if (e == 0) return;
      parent = append(d, parent, e - 1, 1, r);
    }
  }

  inline int32_t append(int64_t d, int32_t parent, int64_t expert, int64_t count, double reward) {
    Level& lv = levels_[static_cast<size_t>(d - 1)];
    lv.parent.push_back(parent);
    lv.expert.push_back(static_cast<int16_t>(expert));
    lv.count.push_back(count);
    lv.reward.push_back(reward);
    return static_cast<int32_t>(lv.parent.size() - 1);
  }

  // rows[0, n) all share the path to a node at depth d-1 (index `parent` in its level). Sort them
  // stably by their expert at depth d, emit one node per expert, recurse into each run.
  void group(int32_t* rows, int64_t n, int64_t s, int64_t d, int32_t parent) {
    if (d > max_depth_ || s + d - 1 >= L_) return;
    if (n == 1) {
      chain(rows[0], s, d, parent);
      return;
    }
    // The digit scratch is indexed like `rows`, so a recursion into one run overwrites only that
    // run's digits and the later runs' digits survive.
    int64_t* dg = digit_.data() + (rows - rows_base_);
    for (int64_t i = 0; i < n; ++i) dg[i] = digit(rows[i], s, d);
    if (n <= 16) {  // insertion sort, stable
      for (int64_t i = 1; i < n; ++i) {
        const int64_t key = dg[i];
        const int32_t row = rows[i];
        int64_t j = i;
        for (; j > 0 && dg[j - 1] > key; --j) {
          dg[j] = dg[j - 1];
          rows[j] = rows[j - 1];
        }
        dg[j] = key;
        rows[j] = row;
      }
    } else if (n >= E_ / 2) {  // counting sort over digits 0..E, stable
      std::fill(bucket_.begin(), bucket_.end(), 0);
      for (int64_t i = 0; i < n; ++i) ++bucket_[static_cast<size_t>(dg[i]) + 1];
      for (size_t b = 1; b < bucket_.size(); ++b) bucket_[b] += bucket_[b - 1];
      int32_t* out = tmp_.data();
      int64_t* out_dg = tmp_digit_.data();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t at = bucket_[static_cast<size_t>(dg[i])]++;
        out[at] = rows[i];
        out_dg[at] = dg[i];
      }
      std::memcpy(rows, out, sizeof(int32_t) * static_cast<size_t>(n));
      std::memcpy(dg, out_dg, sizeof(int64_t) * static_cast<size_t>(n));
    } else {  // few rows, many experts
      pairs_.clear();
      for (int64_t i = 0; i < n; ++i) pairs_.emplace_back(dg[i], rows[i]);
      std::stable_sort(pairs_.begin(), pairs_.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      for (int64_t i = 0; i < n; ++i) {
        dg[i] = pairs_[static_cast<size_t>(i)].first;
        rows[i] = pairs_[static_cast<size_t>(i)].second;
      }
    }
    for (int64_t b = 0; b < n;) {
      const int64_t e = dg[b];
      int64_t end = b + 1;
      while (end < n && dg[end] == e) ++end;
      if (e != 0) {  // digit 0: rows whose sub-path ended above depth d
        double r = 0.0;
        for (int64_t i = b; i < end; ++i) r += R_[rows[i]];  // row (token) order: deterministic
        const int32_t node = append(d, parent, e - 1, end - b, r);
        group(rows + b, end - b, s, d + 1, node);
      }
      b = end;
    }
  }

  const int64_t* P_;
  const double* R_;
  int64_t L_, max_depth_, E_;
  std::vector<Level> levels_;
  std::vector<int64_t> bucket_;
  std::vector<int64_t> digit_, tmp_digit_;
  std::vector<int32_t> tmp_;
  std::vector<std::pair<int64_t, int32_t>> pairs_;
  const int32_t* rows_base_ = nullptr;
  bool reserved_ = false;
};

inline int64_t level_key(int64_t parent, int64_t expert) { return (parent << kExpertBits) | expert; }

// Every expert id in [-1, num_experts) (see routing_trie.h): the builder indexes its buckets with
// them, so an id out of range corrupted the heap (issue 28).
void check_paths_cpu(const int64_t* P, int64_t n, int64_t num_experts) {
  int64_t bad = 0, first = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = P[i];
    if (v < -1 || v >= num_experts) {
      if (bad++ == 0) first = v;
    }
  }
  TORCH_CHECK_VALUE(bad == 0, "routing_update: paths entries must be expert ids in [0, ", num_experts,
                    ") or -1 (no routing); ", bad, " are not (the first: ", first, ")");
}

// The trie's structural invariants that the merge relies on (see routing_trie.h).
void check_trie_cpu(const int32_t* par, const int16_t* exp, const int64_t* cnt, at::IntArrayRef level_sizes,
                    int64_t num_layers, int64_t num_experts) {
  int64_t offset = 0, parents = num_layers;
  for (size_t d = 0; d < level_sizes.size(); ++d) {
    const int64_t size = level_sizes[d];
    int64_t prev_key = -1;
    for (int64_t i = offset; i < offset + size; ++i) {
      TORCH_CHECK_VALUE(par[i] >= 0 && par[i] < parents, "routing_update: node ", i, " (depth ", d + 1,
                        ") has parent ", par[i], " outside [0, ", parents, ")");
      TORCH_CHECK_VALUE(exp[i] >= 0 && exp[i] < num_experts, "routing_update: node ", i, " has expert id ", exp[i],
                        " outside [0, ", num_experts, ")");
      TORCH_CHECK_VALUE(cnt[i] >= 0, "routing_update: node ", i, " has a negative count ", cnt[i]);
      const int64_t key = level_key(par[i], exp[i]);
      TORCH_CHECK_VALUE(key > prev_key, "routing_update: depth ", d + 1,
                        " is not strictly increasing in (parent, expert) at node ", i);
      prev_key = key;
    }
    offset += size;
    parents = size;
  }
}

}  // namespace

TrieArrays routing_update_cpu(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                              const at::Tensor& reward_sum, const at::Tensor& first_seen,
                              const at::Tensor& last_seen, at::IntArrayRef level_sizes, const at::Tensor& paths_in,
                              const at::Tensor& rewards_in, int64_t step, int64_t max_depth, int64_t num_experts,
                              bool suffix) {
  check_update_args(parent, expert, count, reward_sum, first_seen, last_seen, level_sizes, paths_in, rewards_in,
                    step, max_depth, num_experts);
  TORCH_CHECK(paths_in.device().is_cpu(), "routing_update_cpu: tensors must be on the CPU");
  const at::Tensor paths = paths_in.contiguous();
  const at::Tensor rewards = rewards_in.contiguous();
  const int64_t N = paths.size(0), L = paths.size(1);
  TORCH_CHECK(N <= INT32_MAX, "routing_update: at most 2^31-1 tokens per update");
  const int64_t* P = paths.data_ptr<int64_t>();
  const double* R = rewards.data_ptr<double>();
  const int32_t step32 = static_cast<int32_t>(step);
  check_paths_cpu(P, N * L, num_experts);
  check_trie_cpu(parent.data_ptr<int32_t>(), expert.data_ptr<int16_t>(), count.data_ptr<int64_t>(), level_sizes, L,
                 num_experts);

  // 1. The batch's own trie, level by level, in canonical order.
  BatchBuilder builder(P, R, L, max_depth, num_experts);
  std::vector<int32_t> rows;
  rows.reserve(static_cast<size_t>(N));
  const int64_t num_starts = num_start_layers(L, suffix);
  for (int64_t s = 0; s < num_starts; ++s) {
    rows.clear();
    for (int64_t n = 0; n < N; ++n)
      if (P[n * L + s] >= 0) rows.push_back(static_cast<int32_t>(n));
    builder.build(rows, s);
  }
  std::vector<Level>& batch = builder.levels();

  // 2. Merge with the existing trie, level by level. pos_old / pos_new map the previous level's
  // indices (existing trie / batch) to their index in the merged level; for depth 1 the parent
  // is the start layer and needs no mapping.
  const int32_t* tpar = parent.data_ptr<int32_t>();
  const int16_t* texp = expert.data_ptr<int16_t>();
  const int64_t* tcnt = count.data_ptr<int64_t>();
  const double* trew = reward_sum.data_ptr<double>();
  const int32_t* tfst = first_seen.data_ptr<int32_t>();
  const int32_t* tlst = last_seen.data_ptr<int32_t>();
  const int64_t old_depth = static_cast<int64_t>(level_sizes.size());
  int64_t batch_depth = 0;
  for (int64_t d = 0; d < max_depth; ++d)
    if (!batch[static_cast<size_t>(d)].parent.empty()) batch_depth = d + 1;
  const int64_t depth = std::max(old_depth, batch_depth);

  std::vector<Level> merged(static_cast<size_t>(depth));
  std::vector<int32_t> pos_old, pos_new, next_old, next_new;
  // pos_* is the identity while the previous level was taken over unchanged (depth 1: parents
  // are start layers; a level with nodes on one side only): then parents need no remapping and
  // the level moves over without a copy, the common case for a fresh tree and for deep levels.
  bool old_identity = true, new_identity = true;
  int64_t offset = 0, total = 0;
  for (int64_t d = 0; d < depth; ++d) {
    const int64_t nT = d < old_depth ? level_sizes[static_cast<size_t>(d)] : 0;
    Level empty_level;
    Level& B = d < max_depth ? batch[static_cast<size_t>(d)] : empty_level;
    const int64_t nB = static_cast<int64_t>(B.size());
    Level& M = merged[static_cast<size_t>(d)];
    if (nT == 0) {  // only batch nodes
      M.parent = std::move(B.parent);
      if (!new_identity)
        for (auto& p : M.parent) p = pos_new[static_cast<size_t>(p)];
      M.expert = std::move(B.expert);
      M.count = std::move(B.count);
      M.reward = std::move(B.reward);
      M.first.assign(static_cast<size_t>(nB), step32);
      M.last.assign(static_cast<size_t>(nB), step32);
      old_identity = new_identity = true;
    } else if (nB == 0) {  // only existing nodes
      M.parent.assign(tpar + offset, tpar + offset + nT);
      if (!old_identity)
        for (auto& p : M.parent) p = pos_old[static_cast<size_t>(p)];
      M.expert.assign(texp + offset, texp + offset + nT);
      M.count.assign(tcnt + offset, tcnt + offset + nT);
      M.reward.assign(trew + offset, trew + offset + nT);
      M.first.assign(tfst + offset, tfst + offset + nT);
      M.last.assign(tlst + offset, tlst + offset + nT);
      old_identity = new_identity = true;
    } else {
      const size_t cap = static_cast<size_t>(nT + nB);
      M.parent.reserve(cap);
      M.expert.reserve(cap);
      M.count.reserve(cap);
      M.reward.reserve(cap);
      M.first.reserve(cap);
      M.last.reserve(cap);
      next_old.assign(static_cast<size_t>(nT), 0);
      next_new.assign(static_cast<size_t>(nB), 0);
      auto old_parent = [&](int64_t i) -> int64_t {
        const int64_t p = tpar[offset + i];
        return old_identity ? p : pos_old[static_cast<size_t>(p)];
      };
      auto new_parent = [&](int64_t j) -> int64_t {
        const int64_t p = B.parent[static_cast<size_t>(j)];
        return new_identity ? p : pos_new[static_cast<size_t>(p)];
      };
      auto push = [&](int64_t par, int64_t e, int64_t c, double r, int32_t f, int32_t l) {
        M.parent.push_back(static_cast<int32_t>(par));
        M.expert.push_back(static_cast<int16_t>(e));
        M.count.push_back(c);
        M.reward.push_back(r);
        M.first.push_back(f);
        M.last.push_back(l);
      };
      int64_t i = 0, j = 0;
      while (i < nT || j < nB) {
        const int64_t pi = i < nT ? old_parent(i) : 0, pj = j < nB ? new_parent(j) : 0;
        const int64_t ki = i < nT ? level_key(pi, texp[offset + i]) : INT64_MAX;
        const int64_t kj = j < nB ? level_key(pj, B.expert[static_cast<size_t>(j)]) : INT64_MAX;
        const int32_t here = static_cast<int32_t>(M.size());
        if (ki < kj) {
          const int64_t t = offset + i;
          push(pi, texp[t], tcnt[t], trew[t], tfst[t], tlst[t]);
          next_old[static_cast<size_t>(i++)] = here;
        } else if (kj < ki) {
          const size_t b = static_cast<size_t>(j);
          push(pj, B.expert[b], B.count[b], B.reward[b], step32, step32);
          next_new[static_cast<size_t>(j++)] = here;
        } else {
          const int64_t t = offset + i;
          const size_t b = static_cast<size_t>(j);
          push(pi, texp[t], saturating_add(tcnt[t], B.count[b]), trew[t] + B.reward[b], tfst[t], step32);
          next_old[static_cast<size_t>(i++)] = here;
          next_new[static_cast<size_t>(j++)] = here;
        }
      }
      pos_old.swap(next_old);
      pos_new.swap(next_new);
      old_identity = new_identity = false;
      B = Level();  // free the batch level
    }
    offset += nT;
    total += static_cast<int64_t>(M.size());
    TORCH_CHECK(total <= kMaxNodes, "routing_update: the trie would exceed 2^31-1 nodes");
  }

  // 3. Concatenate the levels into fresh tensors.
  auto opts = paths.options();
  at::Tensor o_par = at::empty({total}, opts.dtype(at::kInt)), o_exp = at::empty({total}, opts.dtype(at::kShort));
  at::Tensor o_cnt = at::empty({total}, opts.dtype(at::kLong)), o_rew = at::empty({total}, opts.dtype(at::kDouble));
  at::Tensor o_fst = at::empty({total}, opts.dtype(at::kInt)), o_lst = at::empty({total}, opts.dtype(at::kInt));
  at::Tensor o_sizes = at::empty({depth}, opts.dtype(at::kLong));
  int64_t at_node = 0;
  for (int64_t d = 0; d < depth; ++d) {
    const Level& M = merged[static_cast<size_t>(d)];
    const size_t m = M.size();
    std::memcpy(o_par.data_ptr<int32_t>() + at_node, M.parent.data(), m * sizeof(int32_t));
    std::memcpy(o_exp.data_ptr<int16_t>() + at_node, M.expert.data(), m * sizeof(int16_t));
    std::memcpy(o_cnt.data_ptr<int64_t>() + at_node, M.count.data(), m * sizeof(int64_t));
    std::memcpy(o_rew.data_ptr<double>() + at_node, M.reward.data(), m * sizeof(double));
    std::memcpy(o_fst.data_ptr<int32_t>() + at_node, M.first.data(), m * sizeof(int32_t));
    std::memcpy(o_lst.data_ptr<int32_t>() + at_node, M.last.data(), m * sizeof(int32_t));
    o_sizes.data_ptr<int64_t>()[d] = static_cast<int64_t>(m);
    at_node += static_cast<int64_t>(m);
  }
  return {o_par, o_exp, o_cnt, o_rew, o_fst, o_lst, o_sizes};
}

#ifdef MEMTRACE_WITH_CUDA
// The CUDA op's entry point lives here, in a host-compiled file, so that every error it raises for
// bad input is thrown after routing_update_cuda_run has returned: no such exception starts in, or
// unwinds through, a frame of routing_trie_cuda.cu (see CudaUpdateResult in routing_trie.h).
TrieArrays routing_update_cuda(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                               const at::Tensor& reward_sum, const at::Tensor& first_seen,
                               const at::Tensor& last_seen, at::IntArrayRef level_sizes, const at::Tensor& paths,
                               const at::Tensor& rewards, int64_t step, int64_t max_depth, int64_t num_experts,
                               bool suffix) {
  check_update_args(parent, expert, count, reward_sum, first_seen, last_seen, level_sizes, paths, rewards, step,
                    max_depth, num_experts);
  TORCH_CHECK(paths.is_cuda(), "routing_update_cuda: tensors must be on a CUDA device");
  // the CUDA kernels index items with int32-sized grids and cub takes an int item count
  TORCH_CHECK(paths.size(0) * num_start_layers(paths.size(1), suffix) < INT32_MAX,
              "routing_update: N * starts must be below 2^31 on CUDA");
  CudaUpdateResult result = routing_update_cuda_run(parent, expert, count, reward_sum, first_seen, last_seen,
                                                    level_sizes, paths, rewards, step, max_depth, num_experts, suffix);
  switch (result.error) {
    case CudaUpdateResult::kOk:
      break;
    case CudaUpdateResult::kBadPaths:
      TORCH_CHECK_VALUE(false, "routing_update: paths entries must be expert ids in [0, ", num_experts,
                        ") or -1 (no routing); ", result.bad, " are not");
      break;
    case CudaUpdateResult::kBadNodes:
      TORCH_CHECK_VALUE(false, "routing_update: ", result.bad, " trie node(s) at depth ", result.depth,
                        " break the trie's invariants (parent inside the previous level, expert id in [0, ",
                        num_experts, "), count >= 0, strictly increasing (parent, expert))");
      break;
    case CudaUpdateResult::kTooManyNodes:
      TORCH_CHECK(false, "routing_update: the trie would exceed 2^31-1 nodes");
      break;
  }
  TORCH_CHECK(result.error == CudaUpdateResult::kOk, "routing_update_cuda: unknown error code ",
              static_cast<int>(result.error));
  return std::move(result.arrays);
}
#endif

}  // namespace memtrace
