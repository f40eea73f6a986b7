# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""Exact, dynamic half-space reporting core (private; see halfspace.py).

Design
======
Answer ``{p : <p, w> >= b}`` exactly for a dynamic set of points.  Two ideas
beat a brute-force scan, which is memory-bound (or, once the data fit in
cache, bound by the multiply-adds):

1. **Pruning with ball trees.**  For a ball with centre ``c`` and radius
   ``r``, every point ``p`` in it satisfies
   ``<c,w> - r||w|| <= <p,w> <= <c,w> + r||w||``.  A subtree whose upper
   bound is below ``b`` is skipped; one whose lower bound is at least ``b``
   is reported whole, without a single inner product (``query_count`` even
   reads only the node's live count).  This pays on clustered data.
2. **Reading fewer bytes.**  Each point also has an 8-bit code ``q_p`` with
   a per-point float32 scale ``s_p`` (``q_p = round(p / s_p)`` in
   [-127, 127], ``s_p = max|p| / 127``).  A query is quantised to int8 on
   two levels, ``w = t q_w + t2 q2_w + e2_w`` with ``t2 = t / (2 qmax + 2)``
   (``|q_w|, |q2_w| <= qmax``: 127, or 63 on the AVX2 kernel whose
   ``vpmaddubsw`` saturates beyond that), and both ``D1 = <q_p, q_w>`` and
   ``D2 = <q_p, q2_w>`` are computed *exactly* in int32 from the same code
   loads (d <= 16384; beyond, screening is off).  Since
   ``<p,w> = s_p (t D1 + t2 D2) + s_p <q_p, e2_w> + <e_p, w>`` with
   ``e_p = p - s_p q_p``, Cauchy-Schwarz gives the per-point bound
   ``|<p,w> - s_p (t D1 + t2 D2)| <= a_p ||e2_w|| + c_p ||w||`` with
   ``a_p = s_p ||q_p||`` and ``c_p = ||e_p||`` stored per point (float32,
   rounded up).  ``||e2_w||`` is about ``||e_w|| / 256``, so the band is
   essentially ``c_p ||w||``, half of what one query level leaves.  A point
   is accepted if ``approx - bound >= b``, rejected if ``approx + bound <
   b``, and otherwise *refined*: its residual has its own code,
   ``e_p = s2_p q2_p + e2_p`` (``s2_p = max|e_p| / 127``, int8), and with
   ``E1 = <q2_p, q_w>``, ``E2 = <q2_p, q2_w>`` (exact int32),
   ``|<p,w> - s_p (t D1 + t2 D2) - s2_p (t E1 + t2 E2)|
   <= (a_p + a2_p) ||e2_w|| + c2_p ||w||``, where ``c2_p = ||e2_p||`` is
   stored and ``a2_p = s2_p ||q2_p|| <= c_p + c2_p``.  This band is about
   100 times narrower; only the points it leaves undecided are verified by
   an exact dot product.  Leaves are screened through the codes: d bytes
   plus 12 per point instead of 4d (float32) or 8d (float64); a refined
   point reads d + 8 bytes (its level-2 row), a verified one its row of X.
   On Gaussian data (N = 200k, 10% selectivity) about 2.5% of the points
   are refined and 0.01-0.02% verified.
3. **Leaf-relative codes** (tight clusters).  Absolute codes spend their
   8 bits on the whole range of p; in a leaf of a tight cluster the
   points differ from the leaf centre c by far less.  Such a leaf also
   stores, per point, 4-bit codes of r = p - c on two nibble planes with
   one scale per leaf (see "Leaf-relative codes" below): stage 0 reads
   d / 2 bytes per point and decides with two integer comparisons against
   thresholds computed once per leaf and query; stage 1 reads the other
   nibble plane (and a second query level) for the 16-slot blocks holding
   undecided points; where a row of X spans at least 8 cache lines, stage
   2 reads a third 4-bit code per feature, d / 2 bytes per point stored
   point-major, for the points still undecided; what is left is verified
   exactly.  Leaves whose centres lie near b skip stage 0 (see "Query
   side"): there it would leave too many.  On the benchmark's clustered
   data (N = 200k, d = 128, 10% selectivity) stage 1 sees about a third of
   the screened points (30.6k of 96.4k; 18.0k without the skip),
   1.1% reach stage 2 and 0.08% verification.

Semantics and rounding (why the answer is exact)
------------------------------------------------
The reported set is ``{p : score(p, w) >= b}`` (ties at ``b`` included),
where ``score`` is the inner product of the stored values accumulated in
float64 (float32 inputs are widened exactly, so every product is exact for
float32).  Any float64 summation order of a d-term dot product differs from
the real value by at most ``gamma_d * sum_j |p_j w_j|``,
``gamma_d = d u / (1 - d u)``, ``u = 2**-53``.  Every bound (tree and
screening) is widened by ``GAM * ||p|| ||w||`` with ``GAM = 16 (d + 8) u``
(a generous multiple of ``gamma_d``), by a relative ``1e-9`` for the rounding
of the bound arithmetic itself, and by an absolute ``1e-290`` for underflow;
stored radii, norms and per-point constants are rounded *up*.  Hence a
point accepted by a bound has ``score >= b`` for *every* summation order,
and a rejected one has ``score < b``; only points whose value is within the
band are decided by the one verification kernel, so the result does not
depend on which path (subtree report, screen, verification) a point took.
Widening a bound only ever sends more points to verification, never changes
an answer.  Non-finite bound arithmetic (overflow for huge inputs, NaN
marking a tombstone) fails both comparisons and falls through to
verification.

Both query levels and their residual are computed in float64: each of the
four roundings in ``e2_w = (w - t q_w) - t2 q2_w`` errs by at most
``u (|w_j| + t)``, so ``||e2_w||`` is widened by ``8 u (||w|| + t sqrt(d))``.
The point constants are computed in float64 from the float32 scales (every
``s q`` is exact); the computed ``e_p`` and ``e2_p`` each err by at most
``u`` relative, so ``c2_p`` is widened by ``4 u c_p``.  In the refinement
(float64) the approximation is a sum of four products: it is widened by
``1e-9`` times the sum of their magnitudes (not of the sum, which may cancel).

The screening decision is evaluated in float32 when the query's constants
``t2``, ``t``, ``A``, ``C`` lie in (1e-30, 1e30) and ``|b| < 1e30``
(otherwise in float64, as above).  The approximation is evaluated as
``s_p (t D1 + t2 D2)``: each term ``t D`` has three roundings (the int32 ->
float32 conversion of the dot, ``t`` to float32, the product), the sum and
the product with ``s_p`` one each, all at most ``2**-24`` relative to the
magnitude ``s_p (|t D1| + |t2 D2|)``, so a relative widening of ``1e-6`` of
that magnitude covers them (and, if the approximation overflows, so does
the magnitude: the bound becomes infinite or NaN, which means "refine").
The terms ``t D`` are 0 or normal (> 1e-30), so only the products with
``s_p`` (approximation and magnitude), the two products of the bound and
``rel`` times the magnitude can underflow, each by at most the smallest
normal float32 even when subnormals are flushed to zero (FTZ): ``1e-37``
absolute covers those five.  The final subtraction and addition round by
at most ``2**-24`` of ``|approx| + m``, which the widenings (relative
``1e-6`` on both) cover as well.  ``A`` and ``C`` are rounded up and ``c_p``, ``c2_p``
are stored as at least the smallest normal float32 (so treating subnormal
inputs as zero, DAZ, cannot shrink a bound); ``b`` is rounded outwards (up
for accepting, down for rejecting).  Fused multiply-adds, where the compiler
contracts, only remove roundings.  The tests pin all of this on adversarial
inputs: scores one grid step (2**-20 or 2**-40 relative) away from ``b`` on
both sides and exactly on it, and scores swept across the edge of the
refinement band, at scales 2**-90 .. 2**90, for every kernel.

Leaf-relative codes
-------------------
For a leaf with stored centre ``c`` (float32) and scale ``s4`` (float32,
``max |p_j - c_j| / 7`` over its live points; ``s8 = s4 / 16``, ``s12 =
s4 / 256``), every live point has ``r = p - c = s12 q12 + e2`` with
``q12 = round(r / s12)``, and its coarser codes are the floors ``q8 =
floor((q12 + 8) / 16)``, ``qh = floor((q8 + 8) / 16)`` in [-7, 7], with
remainders ``q3 = q12 - 16 q8`` and ``ql = q8 - 16 qh`` in [-8, 7]; so
``r = s8 q8 + e1 = s4 qh + e0``.  (Rounding each level on its own would
clip ``ql`` or ``q3`` at +8 for one feature in 32 and double
their residual.)  The leaf stores ``A0 >= max ||s4 qh||``, ``C0 >= max
||e0||``, ``A1 >= max ||s8 q8||``, ``C1 >= max ||e1||``, ``A2 >= max
||s12 q12||``, ``C2 >= max ||e2||`` (float32, rounded up; each residual
is computed from r, errs by at most u (|e| + |r|) plus the u |r| of r,
and |e_j| <= 1.15 |r_j|, so ``6 u ||r||`` is added).  With the computed
``cw`` (within ``gam ||c|| ||w||`` of ``<c, w>``, and ``||p|| <= ||c|| +
radius``):

- stage 0: ``|score - cw - s4 t D0| <= M0 = A0 ||e1_w|| + C0 ||w|| +
  gam (2 ||c|| + radius) ||w||`` with the exact integer ``D0 = <qh, qw>``
  and ``e1_w = w - t qw`` (one query level);
- stage 1: ``|score - cw - s8 t2 F| <= M1 = A1 ||e2_w|| + C1 ||w|| + (the
  same gam term)`` with ``F = <q8, K qw + qw2>`` exact in int64, ``K = 2
  qmax + 2`` (so ``t = K t2`` exactly);
- stage 2: ``|score - cw - s12 t2 F3| <= M2 = A2 ||e2_w|| + C2 ||w|| +
  (the same gam term)`` with ``F3 = <q12, K qw + qw2> = 16 F + <q3, K qw
  + qw2>``, exact in int64.

All three are widened by ``REL`` relative and ``TINY`` absolute, and turned into
integer thresholds once per leaf: ``D >= hi`` implies
``cw + unit D - M >= b`` and ``D < lo`` implies ``cw + unit D + M < b``
(unit = s4 t, s8 t2 or s12 t2), computed as ``ceil`` / ``floor`` of
``(b - cw +- (M + err)) / unit`` widened by ``1e-12`` relative for the
two roundings of the division and of ``unit``, ``err = REL (|b| + |cw| +
M) + TINY`` for the sums, and clamped to ``+-2**30`` (stage 0) or
``+-2**40`` (stages 1 and 2), beyond every reachable |D|.  If ``unit`` is not a
safe positive number or a threshold is NaN, the leaf takes the absolute
path for that query.  Tombstones are skipped when reported (a leaf with
dead slots checks ids) and when verified.

A leaf gets relative codes at build time, in refined segments only, if
``C1 <= REL_GAIN * mean(c_p)`` (its 8-bit relative error bound is at most
half its points' mean absolute level-1 error; on Gaussian data it never
is, so there the absolute codes alone are used, and the encoding is skipped
when a quick estimate of C1 already fails).  An update re-encodes the point
against its leaf and grows the constants, or turns the leaf's relative
codes off if the new ``||e1||`` exceeds ``REL_GROW * C1``; a leaf that
single adds extend turns them off (until the next build).  The nibble
planes cost ``d`` bytes per slot, the third-level rows ``d / 2`` more
where stage 2 runs; they are allocated when a build first finds a leaf
that qualifies (and kept from then on), so an index of Gaussian-like data
carries none (d = 128, float32: 998 instead of 1190 bytes per point).

Stage 2 runs where a row of X has at least ``STAGE2_MIN_ROW`` = 512 bytes
(d >= 128 in float32, 64 in float64): it replaces most exact dots, each a
row of X, by one read of a ``d / 2``-byte row.  With 2 or 4 cache lines
per row of X it was 3-7% slower (the extra pipeline step costs more than
the lines it saves); with 8 it was 4-10% faster.

Query side: stage 0 runs as a leaf is reached; the undecided slots of a
chunk wait one chunk for stage 1, whose undecided slots wait one more
chunk (their third-level rows prefetched into L2) for stage 2, whose
undecided slots wait one more chunk (their rows of X prefetched) for
verification, so that the memory has arrived; the pipeline is flushed at
the end of the query.  The DFS prefetches both children's centres (and a
relative leaf's first high-plane lines) into L2 when it pushes them, and
the centre ``NODE_AHEAD`` = 8 nodes further in preorder (the walk's
memory order) as it settles a node (against none, N = 200k, one
thread: 0.93-1.0x the time warm and 0.92-0.97x with cold caches over
selectivities 0.1-10%, clustered and Gaussian, except clustered d = 32 at
10%, 0.99-1.0x / 0.99-1.02x; 4 nodes ahead: 0.98-1.0x / 0.95-0.99x);
the kernels that stream runs of blocks prefetch 2 KiB ahead of the block
they start (``sqd_stream_ahead``: 0.88-0.97x the query time with warm
caches, 0.77-0.95x with cold ones).
Stage 1's low-plane blocks are not prefetched: on the Intel host a
software prefetch of them made queries 5% slower (it waits on full miss
queues), and running stage 1 in the chunk itself instead of one chunk
later measured the same.

A relative leaf whose centre's score ``cw`` lies near ``b`` skips stage 0:
if ``|cw - b| < M0 + 1.5 spread`` (``spread = radius ||w|| / sqrt(d)``,
the standard deviation of the scores of isotropic points filling the
ball), so many of its slots would be left undecided that nearly every
16-slot block would be read again by stage 1 (one undecided slot is
enough), and its chunks go to stage 1 whole: one kernel computes each
block's dots and decides its 16 slots while they are in registers, without
a slot list.  Stage 1's bounds hold for every point, so the answer and the
later stages do not change.  On the clustered benchmark (N = 200k, 10%)
stage 1 then sees 18.7k of 47.8k screened points at d = 32 (7.1k before)
and 30.6k of 96.4k at d = 128 (18.0k before), and the same index answered
in 0.85 times the time of never skipping (0.90 at 1%, 0.94 at 0.1%; 1.5
spreads was the best of 1 .. 4).  For data that are not isotropic within
a leaf the spread is a guess; a wrong one only moves work between the two
exact paths.

Splitting one query across threads
----------------------------------
A batch shares its queries out among the threads.  One large query (a
single ``w``, or each query of a batch with fewer than 4 queries per
thread) is split instead (``_query_split``): the calling thread bounds the
segment roots and keeps opening the heaviest straddling subtree, skipping
or reporting whole the children its bounds decide, until no subtree holds
more than 1 / (4 threads) of the straddling points (or 64 subtrees); the
threads then walk the subtrees, heaviest first, each taking the next one
when done, with their own query buffers (the query is prepared again from
the same float64 ``w``, so every bound is the same) and part buffers.
Each subtree's walk flushes the relative-code pipeline at its end, so its
hits are one run; the runs are concatenated in subtree order, which
depends on the thread count but not on the timing.  A point is decided by
the same bounds and kernels as on one thread, so the answer is the same
set.  The split costs about 5 us (waking the threads, their buffers); it
is made only when the straddling points times ``d + 16`` reach 2**19 (it
broke even at about 10k points at d = 32 and 4k at d = 128), and never
with n_threads = 1.  On the benchmark's N = 200k, two threads answered
large single queries 1.4-1.9 times faster than one.  A split ends only
when every thread of its team has arrived: with another process busy on
one of the two cores, the median still fell (1.3-2.1x) but 1-10% of the
queries waited for a time slice (p99 5-8 ms against 0.4-3.3 ms on one
thread).  A back-off that ran the next queries on one thread after a split
whose caller waited long did not help (the helper's spin-wait and
preemption inside the walks are not visible to the caller), so it was not
kept; the public class tells busy machines to pass n_threads = 1.

Storage and invariants
======================
Points live in *slots* ``0 .. n_slots-1`` of growable arrays (``X`` in the
working dtype; ``scale``/``ea``/``ec`` float32; ``ids`` intp;  ``codes``
u8; ``rows2``: per slot ``s2_p`` and ``c2_p`` as float32, then the dpad
level-2 codes ``q2_p + 128``, contiguous so that refining a point touches
one or two cache lines; ``rhi``/``rlo``: the leaf-relative nibble planes,
``dpad8 / 2`` bytes each per slot; ``r3``: the third-level rows, ``dpad8 /
2`` bytes per slot where stage 2 runs, else empty; all three empty until
a leaf first uses them).  Memory per point: ``X`` plus ``2 dpad + 28``
bytes in the slot arrays, ``dpad8`` more with the relative planes and
``dpad8 / 2`` more with stage 2, plus the hash map below and the tree nodes
(about 60-70 bytes more).  ``ids[s] == -1`` marks a tombstone, whose ``ea`` is NaN (so its
bounds are NaN: it always reaches the verification, which skips it).  ``id2slot``
(C++ hash map) maps every live id to its slot; ``ids[id2slot[i]] == i``.
Codes are stored as ``q + 128`` in blocks of 16 slots: the codes of slot s
for features 4g..4g+3 are the 4 bytes at ``(s/16)*16*dpad + 64 g + 4 (s%16)``
(``dpad`` = d rounded up to a multiple of 4, padding codes are q = 0), so one
64-byte load and one ``vpdpbusd`` (AVX-512 VNNI) or two ``vpmaddubsw``
(AVX2) advance 16 points by 4 features with no horizontal sums.  The kernel
is chosen at run time (portable C++ otherwise); all give identical dots.

Slots are partitioned into contiguous *segments* ``[seg_start, seg_end)``,
each with its own ball tree (logarithmic method, Bentley-Saxe).  Tree nodes
are stored in DFS preorder: the left child of node i is i + 1, the right
child is ``node_right[i]`` (-1 for a leaf); node i covers the slot range
``[node_start[i], node_end[i])``.

A node of more than ``leaf_size`` points is split by 2-means.  Two
far-apart points, refined on nodes of more than 1024 points by a few Lloyd
iterations in full dimension on a sample of at most 256 of the node's
points, give two means; the points are sorted by their projection on the
difference of the means and cut where the within-side sum of squares of the
projections is least (1-D 2-means over every cut).  The Lloyd refinement
pays at the upper levels, where a node holds many clusters (there the
far-pair direction gives lopsided, cluster-cutting splits); below, it made
no difference in measurements.  The cut may be lopsided, so that a small
cluster, or a piece of one cut at a higher level, gets its own node instead
of sharing a ball with part of a big cluster: a cluster's ball is then as
small as the cluster.  Each side keeps at least 2 points (unless the
node has fewer than 8): in high dimension the far pair's own points
project far outside the rest, and without that floor small nodes peeled
them off as single-point leaves (Gaussian data, n = 20,000, d = 130,
leaf_size = 64: 969 of 1372 leaves; queries 1.5x slower).  A depth
budget bounds the depth: with h(m) the height below a node of m points if
every cut were restricted to the middle
half of the range, a cut is taken only if the node's depth + 1 + h(bigger
child) stays within ``min(2 h(n) + 4, 120)`` for a segment of n slots;
otherwise the best cut inside the middle half is taken.  Depth + h(m) never
grows beyond ``max(min(2 h(n) + 4, 120), h(n))``, which bounds the depth:
O(log n), and below ``MAX_DEPTH`` for any realistic n.  Lopsided cuts are
taken in refined segments only (the first, and those of at least 16384
slots); the small tail segments that single adds rebuild again and again
always cut in the middle half: peeling clusters off one by one made their
builds ~3x slower on clustered data (single adds at d = 128: 27 -> 18 us
amortised), for the same work per query.

The slots of a segment are permuted into tree order at build, so a leaf is
a contiguous run and adjacent leaves are screened in one pass.  Per node:
centre (float32), radius (an upper bound on ``||p - c||`` for every slot in
range, live or dead, kept valid under updates), ``||c||`` and the live count
``node_alive``.  The radius is measured from the stored float32 centre, so
rounding the centre costs nothing and any centre is valid: internal nodes
use the centroid; a leaf uses the centroid moved by 20 Badoiu-Clarkson steps
towards the farthest of its 32 points farthest from the centroid (an
approximate minimum enclosing ball), if that gives a smaller radius; on
Gaussian clusters this screens ~10% fewer points.  The node arrays of the
segments are allocated like a stack: segment k's nodes follow segment k-1's,
and only the tail is ever rebuilt.

Updates and amortised costs (n live points, d features, L = leaf_size)
-----------------------------------------------------------------------
- ``remove``: tombstone + hash-map erase + decrement ``node_alive`` on the
  root-to-leaf path: O(depth).  When tombstones exceed a quarter of the
  slots, everything is compacted and rebuilt as one segment: O(n d log n)
  every n/4 removals, i.e. O(d log n) amortised.
- ``add`` of m points: encode (O(m d)).  While the last segment is a single
  leaf with room, the points join it (its radius grows; O(m d), no build).
  Otherwise the new points become a segment, built together with the
  segments it absorbs under one of two merge rules (tombstones in the
  merged tail are compacted away):

  * eager: "merge the last two segments while the second last is smaller
    than twice the last".  Segment sizes at least double towards the
    front: at most log2(n) + 1 segments.
  * lazy (base 3): "merge from the first segment k with 2 size(k) <= the
    sizes after k", so every segment holds more than half of all later
    ones together: O(log n) segments, about 1.5 times as many, and each
    point takes part in about half as many builds (a simulation of 200k
    single adds onto 200k points: 2.9 instead of 8.5 points rebuilt per
    added point; measured, 0.49-0.61 times the time of an add at d = 128).
    A query, though, walks more segments, and small segments prune worse
    (per straddling cluster they screen a leaf each, of up to leaf_size
    points): on an index grown that way (clustered, d = 128) queries took
    1.2-1.25 times as long at 0.1-1% selectivity and 1.06-1.10 at 10%.

  The rule follows the mix of calls: lazy while the rows added outnumber
  the query rows 32 to 1 (LAZY_ADDS_PER_QUERY; both counts halved at every
  segment build, so they describe the recent calls), eager otherwise.  An
  add saves about 10 us under the lazy rule, and a query loses 50-130 us
  on a grown index of 400k points, so the lazy rule pays only when there
  are more than about 5-15 adds per query; 32 leaves a margin (measured,
  200k single adds onto 200k clustered points at d = 128, a 1% query
  every Q adds, total time against the eager rule alone: Q = 4 and 16,
  0.93-0.99 (the same rule); Q = 64, 0.89 under threshold 16; Q =
  128, 0.69).  Either way each point takes part in O(log n) builds, i.e.
  O(d log^2 n) amortised per point, and the answers do not depend on the
  rule.  ``rebuild()`` makes one segment of any index.  Slot arrays double
  their capacity into fresh arrays that come zeroed from the system (pages
  are mapped when first touched, so the unused capacity costs address
  space, not memory) and receive a copy of the used rows: O(d) amortised
  per add, with one pause of about a copy of the index per doubling.  On
  Linux the fresh slot arrays are advised onto transparent huge pages
  before they are touched (a query streams through all of them; with 4 KiB
  pages the TLB misses cost 10-20% of a Gaussian d = 128 query).  Growing
  in place by 1/16 with realloc, tried before, was no cheaper: the
  kernel's remapping splits the huge pages, 60-90 ms per step at N = 200k,
  d = 128.
  A segment build moves the codes with their points (no re-encoding; each
  slot's rows move once, along the cycles of the tree order), and
  tail segments of fewer than 16384 slots, which single adds rebuild over
  and over, skip the Lloyd splits and the leaf-centre refinement (the first
  segment, i.e. every build of a whole index, always gets them).  Where an
  eager add's time goes (200k single adds onto 200k clustered points, d =
  128, timed per build): builds of segments of 16384 slots or more, 5.7
  points rebuilt per added point at about 1.9 us each, 11 us per add;
  tail builds 3.8 points at 0.84 us, 3 us; the call itself, the encoding
  and the insertion-buffer leaf about 3 us.  Under the lazy rule the large
  builds are 3.4 points per add (6.3 us).
- ``update``: overwrite the slot and its code, and grow the radius of each
  ancestor to cover the new value: O(d depth).  When a segment has absorbed
  more updates than half its size, the tail from that segment is rebuilt
  (later segments hold fewer than 2 s slots together under either rule,
  so O(s d log s) for a segment of s slots,
  amortised O(d log s) per update).
- Build of s points: O(s d log s) (depth O(log s); per node a far-pair
  search on at most 512 points (64 in tail segments), Lloyd iterations on
  at most 256 sampled points, one pass over its points and a sort of the
  projections; a leaf's centre refinement costs O(d) per step).  The sort
  is a radix sort of float32 keys (the projections less the first point's,
  scaled by a power of two so that no scale of data overflows or
  underflows them), O(s) per level: ``std::sort`` of (float64, index)
  pairs was 14-19% of a build.  The one
  pass computes the projections, the node's centroid and the points'
  distances to the parent's centre, so an internal node's radius is exact
  without a pass of its own (a leaf's points take one extra pass for their
  parent, then two for the leaf's own centre and radius).  Computing every
  node's centroid and radius in passes of their own cost a quarter of a
  build at d = 128.  The passes are compiled for AVX2 and baseline (eight
  partial sums each, which any summation order's rounding cover allows;
  the node pass takes two rows at a time, so that their sums' dependency
  chains interleave).
  For s >= 16384 the top levels are built first (each node's pass split
  over the threads: 0.88-0.93x the build time at d = 128), the
  subtrees of at most s / (4 threads) points below them in parallel
  (OpenMP), and the pieces are spliced back in preorder; a split depends
  only on the node's points and depth, so the tree is identical to the
  sequential one (the top nodes' centroids may differ in their last bits,
  as their sums are added in pieces).  The
  codes of 8192 or more slots are computed in parallel too (blocks of 16
  slots, which share their code lines; per-slot results, so again the same
  for any thread count).  Refined segments then encode the leaf-relative
  codes of the leaves that qualify (two O(d) passes per point, leaves in
  parallel; per-leaf results).

Queries
-------
Per query: O(d) preparation (quantisation, norms); then a depth-first walk
of each segment's tree.  Worst case (no pruning) O(n d) one-byte integer
multiply-adds plus O(d) per refined or verified point; on clustered data
only the leaves straddling the hyperplane are screened, and subtrees inside
it are reported in O(1) per point.  Leaves are screened in chunks of 256
slots; the level-2 rows of a chunk's undecided slots are prefetched when it
is screened and refined after the next chunk is screened, so that they have
arrived.  The kernels report ids as they accept slots (a leaf's ids are
read in slot order; a separate slot-to-id pass at the end of the query was
5-7% slower at d = 32).  Batches run one query per OpenMP thread
iteration with the GIL released; each query fills its own result vectors,
which are concatenated into CSR in query order (deterministic output for
any thread count).  Sparse (CSR) queries are densified per thread in O(d +
nnz).  ``search`` (exact top-k, ties broken by smaller id) walks the trees
best-child-first with a bounded heap, pruning nodes and points by their
upper bounds (level-1 screening only).

Thread-safety: queries only read the index (they add their rows to the
merge rule's counter while holding the GIL); mutations (add/remove/update/
rebuild) must not run concurrently with anything else (the public class
documents this).
"""

import numpy as np
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt, fabs, ceil, floor, nearbyint, nextafterf, INFINITY, HUGE_VAL, NAN
from libc.stdint cimport int8_t, uint8_t, int16_t, int32_t, int64_t, uint64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from libcpp.vector cimport vector
from libcpp.unordered_map cimport unordered_map

cnp.import_array()

ctypedef Py_ssize_t intp_t

cdef extern from *:
    """
    #include <algorithm>
    #include <cmath>
    #include <cstdint>
    #include <cstring>

    /* The scan kernels are compiled twice (AVX2 and baseline) and picked at
       load time; their helpers are force-inlined into each clone. */
    #if defined(__GNUC__) && defined(__x86_64__) && !defined(__INTEL_COMPILER) && defined(__linux__)
    #define SQD_CLONES __attribute__((target_clones("avx2", "default")))
    #define SQD_INLINE inline __attribute__((always_inline))
    #else
    #define SQD_CLONES
    #define SQD_INLINE inline
    #endif

    #if defined(__linux__)
    #include <sys/mman.h>
    #endif

    /* Ask for transparent huge pages on the whole 2 MiB pages inside
       [p, p + n) (Linux with THP in "madvise" mode; a no-op elsewhere).
       Pages already touched keep their size until khugepaged collapses
       them; pages touched later are huge from the start.  Failure only
       costs speed. */
    static void sqd_advise_hugepages(void* p, size_t n) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        const uintptr_t huge = (uintptr_t)1 << 21;
        uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
        uintptr_t e = ((uintptr_t)p + n) & ~(huge - 1);
        if (e > a) (void)madvise((void*)a, e - a, MADV_HUGEPAGE);
    #else
        (void)p; (void)n;
    #endif
    }

    #if defined(_OPENMP)
    #include <omp.h>
    #else
    static int omp_get_max_threads(void) { return 1; }
    #endif

    /* ---- integer screening dots over the blocked code layout ----------
       Codes are stored as u8 = q + 128 (q in [-127, 127]) in blocks of 16
       slots: the 4 codes of slot s for features 4g..4g+3 sit at byte
       (s / 16) * 16 * dpad + g * 64 + (s % 16) * 4 (dpad = d rounded up to a
       multiple of 4, padding codes are 128, i.e. q = 0).  One 64-byte load
       then feeds 16 slots x 4 features, with no horizontal sums.  The query
       is an int8 code qw (|qw| <= qmax, zero padded); the exact dot is
       <u, qw> - 128 * sum(qw).  Every path is exact in int32 for
       d <= 16384 (|<u, qw>| <= 255 * 127 * 16384 < 2^31). */
    #if defined(__GNUC__) && defined(__x86_64__)
    #define SQD_X86 1
    #include <immintrin.h>
    #else
    #define SQD_X86 0
    #endif

    /* Streaming kernels (runs of consecutive 16-slot blocks: the absolute
       codes, stage 0's high nibble plane, stage 1 of a whole chunk) prefetch
       the lines SQD_STREAM_AHEAD bytes ahead of the block they start.  The
       hardware prefetchers ramp up on every new 4 KiB page and leaf after a
       few misses; running ahead hides that.  Measured (N = 200k, one
       thread, queries alternating with the same code without it; warm: the
       index queried back to back, cold: the caches filled with other data
       before each query): 10% selectivity, clustered d = 128 0.91x the time
       warm and 0.89x cold, d = 32 0.97x / 0.95x, Gaussian d = 128 0.95x /
       0.93x, d = 32 0.88x / 0.89x; 0.1-1%: 0.91-0.93x / 0.90-0.97x; on the
       AVX2 kernels 0.95x warm, 0.77-0.85x cold.  The distance (relative
       codes only, one run, clustered 10%): 1 KiB gave 0.91x / 0.89x against
       0.85x / 0.82x for 2 KiB at d = 128; 4 KiB 0.85x / 0.85x there, but
       0.99x / 0.94x against 0.96x / 0.91x at d = 32.  A run's last lines
       prefetch past its end: usually the next leaf, screened next. */
    #define SQD_STREAM_AHEAD 2048
    static SQD_INLINE void sqd_stream_ahead(const uint8_t* blk, Py_ssize_t blk_bytes) {
        for (Py_ssize_t o = 0; o < blk_bytes; o += 64)
            __builtin_prefetch(blk + SQD_STREAM_AHEAD + o);
    }

    /* Both query codes at once: out[i] = <u_i, qw>, out2[i] = <u_i, qw2>
       (the two levels of the query's quantisation share every code load). */
    static void sqd_block_dots_generic(const uint8_t* codes, Py_ssize_t nblk,
                                       Py_ssize_t dpad, const int8_t* qw, const int8_t* qw2,
                                       int32_t* out, int32_t* out2) {
        for (Py_ssize_t k = 0; k < nblk; ++k) {
            const uint8_t* blk = codes + k * 16 * dpad;
            if (nblk > 1) sqd_stream_ahead(blk, 16 * dpad);
            int32_t acc[16] = {0}, acc2[16] = {0};
            for (Py_ssize_t g = 0; g < dpad / 4; ++g)
                for (int r = 0; r < 16; ++r)
                    for (int t = 0; t < 4; ++t) {
                        int32_t u = (int32_t)blk[g * 64 + r * 4 + t];
                        acc[r] += u * (int32_t)qw[4 * g + t];
                        acc2[r] += u * (int32_t)qw2[4 * g + t];
                    }
            for (int r = 0; r < 16; ++r) {
                out[k * 16 + r] = acc[r];
                out2[k * 16 + r] = acc2[r];
            }
        }
    }

    /* Row dots of one slot's level-2 code (dpad contiguous u8) with both
       query codes. */
    static void sqd_row_dots_generic(const uint8_t* row, Py_ssize_t dpad, const int8_t* qw,
                                     const int8_t* qw2, int32_t* e1, int32_t* e2) {
        int32_t a = 0, b = 0;
        for (Py_ssize_t j = 0; j < dpad; ++j) {
            a += (int32_t)row[j] * (int32_t)qw[j];
            b += (int32_t)row[j] * (int32_t)qw2[j];
        }
        *e1 = a;
        *e2 = b;
    }

    #if SQD_X86
    /* AVX2: u8 x s8 pairs with vpmaddubsw (no saturation since
       2 * 255 * 63 < 2^15: qmax is 63 on this path), widened by vpmaddwd. */
    __attribute__((target("avx2")))
    static void sqd_block_dots_avx2(const uint8_t* codes, Py_ssize_t nblk,
                                    Py_ssize_t dpad, const int8_t* qw, const int8_t* qw2,
                                    int32_t* out, int32_t* out2) {
        const __m256i ones = _mm256_set1_epi16(1);
        const Py_ssize_t ng = dpad / 4;
        for (Py_ssize_t k = 0; k < nblk; ++k) {
            const uint8_t* blk = codes + k * 16 * dpad;
            if (nblk > 1) sqd_stream_ahead(blk, 16 * dpad);
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
            for (Py_ssize_t g = 0; g < ng; ++g) {
                int32_t q4, r4;
                std::memcpy(&q4, qw + 4 * g, 4);
                std::memcpy(&r4, qw2 + 4 * g, 4);
                __m256i q = _mm256_set1_epi32(q4), r = _mm256_set1_epi32(r4);
                __m256i v0 = _mm256_loadu_si256((const __m256i*)(blk + g * 64));
                __m256i v1 = _mm256_loadu_si256((const __m256i*)(blk + g * 64 + 32));
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(v0, q), ones));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(v1, q), ones));
                b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(_mm256_maddubs_epi16(v0, r), ones));
                b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(_mm256_maddubs_epi16(v1, r), ones));
            }
            _mm256_storeu_si256((__m256i*)(out + k * 16), a0);
            _mm256_storeu_si256((__m256i*)(out + k * 16 + 8), a1);
            _mm256_storeu_si256((__m256i*)(out2 + k * 16), b0);
            _mm256_storeu_si256((__m256i*)(out2 + k * 16 + 8), b1);
        }
    }

    __attribute__((target("avx2")))
    static void sqd_row_dots_avx2(const uint8_t* row, Py_ssize_t dpad, const int8_t* qw,
                                  const int8_t* qw2, int32_t* e1, int32_t* e2) {
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i a = _mm256_setzero_si256(), b = a;
        Py_ssize_t j = 0;
        for (; j + 32 <= dpad; j += 32) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(row + j));
            __m256i q = _mm256_loadu_si256((const __m256i*)(qw + j));
            __m256i r = _mm256_loadu_si256((const __m256i*)(qw2 + j));
            a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(v, q), ones));
            b = _mm256_add_epi32(b, _mm256_madd_epi16(_mm256_maddubs_epi16(v, r), ones));
        }
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        s = _mm_hadd_epi32(s, t);          /* a01 a23 b01 b23 */
        s = _mm_hadd_epi32(s, s);          /* a b a b */
        int32_t x = _mm_cvtsi128_si32(s), y = _mm_extract_epi32(s, 1);
        for (; j < dpad; ++j) {
            x += (int32_t)row[j] * (int32_t)qw[j];
            y += (int32_t)row[j] * (int32_t)qw2[j];
        }
        *e1 = x;
        *e2 = y;
    }

    /* AVX-512 VNNI: one vpdpbusd per 16 slots x 4 features and query code. */
    __attribute__((target("avx512f,avx512bw,avx512vnni")))
    static void sqd_block_dots_vnni(const uint8_t* codes, Py_ssize_t nblk,
                                    Py_ssize_t dpad, const int8_t* qw, const int8_t* qw2,
                                    int32_t* out, int32_t* out2) {
        const Py_ssize_t ng = dpad / 4;
        for (Py_ssize_t k = 0; k < nblk; ++k) {
            const uint8_t* blk = codes + k * 16 * dpad;
            if (nblk > 1) sqd_stream_ahead(blk, 16 * dpad);
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
            Py_ssize_t g = 0;
            for (; g + 2 <= ng; g += 2) {
                int32_t q0, q1, r0, r1;
                std::memcpy(&q0, qw + 4 * g, 4);
                std::memcpy(&q1, qw + 4 * g + 4, 4);
                std::memcpy(&r0, qw2 + 4 * g, 4);
                std::memcpy(&r1, qw2 + 4 * g + 4, 4);
                __m512i v0 = _mm512_loadu_si512(blk + g * 64);
                __m512i v1 = _mm512_loadu_si512(blk + g * 64 + 64);
                a0 = _mm512_dpbusd_epi32(a0, v0, _mm512_set1_epi32(q0));
                a1 = _mm512_dpbusd_epi32(a1, v1, _mm512_set1_epi32(q1));
                b0 = _mm512_dpbusd_epi32(b0, v0, _mm512_set1_epi32(r0));
                b1 = _mm512_dpbusd_epi32(b1, v1, _mm512_set1_epi32(r1));
            }
            if (g < ng) {
                int32_t q0, r0;
                std::memcpy(&q0, qw + 4 * g, 4);
                std::memcpy(&r0, qw2 + 4 * g, 4);
                __m512i v0 = _mm512_loadu_si512(blk + g * 64);
                a0 = _mm512_dpbusd_epi32(a0, v0, _mm512_set1_epi32(q0));
                b0 = _mm512_dpbusd_epi32(b0, v0, _mm512_set1_epi32(r0));
            }
            _mm512_storeu_si512(out + k * 16, _mm512_add_epi32(a0, a1));
            _mm512_storeu_si512(out2 + k * 16, _mm512_add_epi32(b0, b1));
        }
    }

    __attribute__((target("avx512f,avx512bw,avx512vnni")))
    static void sqd_row_dots_vnni(const uint8_t* row, Py_ssize_t dpad, const int8_t* qw,
                                  const int8_t* qw2, int32_t* e1, int32_t* e2) {
        __m512i a = _mm512_setzero_si512(), b = a;
        Py_ssize_t j = 0;
        for (; j + 64 <= dpad; j += 64) {
            __m512i v = _mm512_loadu_si512(row + j);
            a = _mm512_dpbusd_epi32(a, v, _mm512_loadu_si512(qw + j));
            b = _mm512_dpbusd_epi32(b, v, _mm512_loadu_si512(qw2 + j));
        }
        if (j < dpad) {
            __mmask64 m = ((__mmask64)1 << (dpad - j)) - 1;   /* dpad - j < 64 */
            __m512i v = _mm512_maskz_loadu_epi8(m, row + j);
            a = _mm512_dpbusd_epi32(a, v, _mm512_maskz_loadu_epi8(m, qw + j));
            b = _mm512_dpbusd_epi32(b, v, _mm512_maskz_loadu_epi8(m, qw2 + j));
        }
        *e1 = _mm512_reduce_add_epi32(a);
        *e2 = _mm512_reduce_add_epi32(b);
    }
    #endif

    /* 2: AVX-512 VNNI, 1: AVX2, 0: portable; capped by sqd_isa_cap (tests
       use the cap to exercise every kernel on one machine). */
    static int sqd_isa_cap = 2;
    static int sqd_isa_detected(void) {
    #if SQD_X86
        static const int isa =
            (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
             && __builtin_cpu_supports("avx512vnni")) ? 2
            : (__builtin_cpu_supports("avx2") ? 1 : 0);
        return isa;
    #else
        return 0;
    #endif
    }
    static int sqd_isa(void) {
        int isa = sqd_isa_detected();
        return isa < sqd_isa_cap ? isa : sqd_isa_cap;
    }

    /* Largest |qw| the active kernel accepts exactly. */
    static int sqd_qmax(void) { return sqd_isa() == 1 ? 63 : 127; }

    static void sqd_block_dots(const uint8_t* codes, Py_ssize_t nblk, Py_ssize_t dpad,
                               const int8_t* qw, const int8_t* qw2, int32_t* out,
                               int32_t* out2) {
    #if SQD_X86
        int isa = sqd_isa();
        if (isa == 2) { sqd_block_dots_vnni(codes, nblk, dpad, qw, qw2, out, out2); return; }
        if (isa == 1) { sqd_block_dots_avx2(codes, nblk, dpad, qw, qw2, out, out2); return; }
    #endif
        sqd_block_dots_generic(codes, nblk, dpad, qw, qw2, out, out2);
    }

    /* Integer dots <u_s, qw> and <u_s, qw2> (u = q + 128: subtract 128 sum(qw)
       for the exact <q_s, qw>) of the whole blocks covering slots [s0, s1),
       s1 - s0 <= 256, into out and out2 (up to 272 entries); returns the
       position of slot s0 in them. */
    static Py_ssize_t sqd_range_dots(const uint8_t* codes, Py_ssize_t dpad, Py_ssize_t s0,
                                     Py_ssize_t s1, const int8_t* qw, const int8_t* qw2,
                                     int32_t* out, int32_t* out2) {
        Py_ssize_t b0 = s0 >> 4, b1 = ((s1 - 1) >> 4) + 1;
        sqd_block_dots(codes + b0 * 16 * dpad, b1 - b0, dpad, qw, qw2, out, out2);
        return s0 - b0 * 16;
    }

    /* Exact integer dots of one slot's level-2 code (row layout, u8 = q2 + 128)
       with both query codes. */
    static void sqd_row_dots(const uint8_t* row, Py_ssize_t dpad, const int8_t* qw,
                             const int8_t* qw2, int32_t sumq128, int32_t sumq2_128,
                             int32_t* e1, int32_t* e2) {
        int32_t a, b;
    #if SQD_X86
        int isa = sqd_isa();
        if (isa == 2) sqd_row_dots_vnni(row, dpad, qw, qw2, &a, &b);
        else if (isa == 1) sqd_row_dots_avx2(row, dpad, qw, qw2, &a, &b);
        else
    #endif
        sqd_row_dots_generic(row, dpad, qw, qw2, &a, &b);
        *e1 = a - sumq128;
        *e2 = b - sumq2_128;
    }

    /* ---- leaf-relative nibble codes (see "Leaf-relative codes") --------
       Two 4-bit planes per slot, blocked by 16 slots: block k of a plane
       starts at byte k * 8 * dpad8 (dpad8 = d rounded up to a multiple of
       8); its 64-byte line g holds features 8g..8g+7 of the 16 slots, byte
       4 r + t carrying feature 8g + t of slot r in its low nibble and
       feature 8g + 4 + t in its high nibble.  A nibble is u = q + 8 (q in
       [-8, 7]; padding features are 8).  out[i] = <u_i, qw> is exact in
       int32 for d <= 16384 (15 * 127 * 16384 < 2^31). */
    static void sqd_nib_dots_generic(const uint8_t* plane, Py_ssize_t nblk,
                                     Py_ssize_t dpad8, const int8_t* qw, int32_t* out) {
        for (Py_ssize_t k = 0; k < nblk; ++k) {
            const uint8_t* blk = plane + k * 8 * dpad8;
            if (nblk > 1) sqd_stream_ahead(blk, 8 * dpad8);
            int32_t acc[16] = {0};
            for (Py_ssize_t g = 0; g < dpad8 / 8; ++g)
                for (int r = 0; r < 16; ++r)
                    for (int t = 0; t < 4; ++t) {
                        int32_t byte = (int32_t)blk[g * 64 + r * 4 + t];
                        acc[r] += (byte & 15) * (int32_t)qw[8 * g + t]
                                  + (byte >> 4) * (int32_t)qw[8 * g + 4 + t];
                    }
            for (int r = 0; r < 16; ++r) out[k * 16 + r] = acc[r];
        }
    }

    #if SQD_X86
    /* AVX2: nibbles unpacked to u8 in [0, 15]; vpmaddubsw pairs stay below
       2 * 15 * 127 < 2^15 (no saturation for any int8 query code). */
    __attribute__((target("avx2")))
    static void sqd_nib_dots_avx2(const uint8_t* plane, Py_ssize_t nblk,
                                  Py_ssize_t dpad8, const int8_t* qw, int32_t* out) {
        const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
        const Py_ssize_t ng = dpad8 / 8;
        for (Py_ssize_t k = 0; k < nblk; ++k) {
            const uint8_t* blk = plane + k * 8 * dpad8;
            if (nblk > 1) sqd_stream_ahead(blk, 8 * dpad8);
            __m256i a0 = _mm256_setzero_si256(), a1 = a0;
            for (Py_ssize_t g = 0; g < ng; ++g) {
                int32_t q4, r4;
                std::memcpy(&q4, qw + 8 * g, 4);
                std::memcpy(&r4, qw + 8 * g + 4, 4);
                __m256i q = _mm256_set1_epi32(q4), r = _mm256_set1_epi32(r4);
                __m256i v0 = _mm256_loadu_si256((const __m256i*)(blk + g * 64));
                __m256i v1 = _mm256_loadu_si256((const __m256i*)(blk + g * 64 + 32));
                __m256i l0 = _mm256_and_si256(v0, m4);
                __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
                __m256i l1 = _mm256_and_si256(v1, m4);
                __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_add_epi16(
                    _mm256_maddubs_epi16(l0, q), _mm256_maddubs_epi16(h0, r)), ones));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_add_epi16(
                    _mm256_maddubs_epi16(l1, q), _mm256_maddubs_epi16(h1, r)), ones));
            }
            _mm256_storeu_si256((__m256i*)(out + k * 16), a0);
            _mm256_storeu_si256((__m256i*)(out + k * 16 + 8), a1);
        }
    }

    __attribute__((target("avx512f,avx512bw,avx512vnni")))
    static void sqd_nib_dots_vnni(const uint8_t* plane, Py_ssize_t nblk,
                                  Py_ssize_t dpad8, const int8_t* qw, int32_t* out) {
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        const Py_ssize_t ng = dpad8 / 8;
        for (Py_ssize_t k = 0; k < nblk; ++k) {
            const uint8_t* blk = plane + k * 8 * dpad8;
            if (nblk > 1) sqd_stream_ahead(blk, 8 * dpad8);
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            Py_ssize_t g = 0;
            for (; g + 2 <= ng; g += 2) {
                int32_t q0, r0, q1, r1;
                std::memcpy(&q0, qw + 8 * g, 4);
                std::memcpy(&r0, qw + 8 * g + 4, 4);
                std::memcpy(&q1, qw + 8 * g + 8, 4);
                std::memcpy(&r1, qw + 8 * g + 12, 4);
                __m512i v0 = _mm512_loadu_si512(blk + g * 64);
                __m512i v1 = _mm512_loadu_si512(blk + g * 64 + 64);
                a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v0, m4), _mm512_set1_epi32(q0));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4),
                                         _mm512_set1_epi32(r0));
                a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(v1, m4), _mm512_set1_epi32(q1));
                a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4),
                                         _mm512_set1_epi32(r1));
            }
            if (g < ng) {
                int32_t q0, r0;
                std::memcpy(&q0, qw + 8 * g, 4);
                std::memcpy(&r0, qw + 8 * g + 4, 4);
                __m512i v0 = _mm512_loadu_si512(blk + g * 64);
                a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v0, m4), _mm512_set1_epi32(q0));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4),
                                         _mm512_set1_epi32(r0));
            }
            _mm512_storeu_si512(out + k * 16, _mm512_add_epi32(_mm512_add_epi32(a0, a1),
                                                               _mm512_add_epi32(a2, a3)));
        }
    }
    /* Stage-1 dots of one block: the two planes are merged into the byte
       u = 16 u_hi + u_lo = q8 + 136 in [16, 255] (one shift and one
       bit-select per half line), so each line takes four vpdpbusd. */
    __attribute__((target("avx512f,avx512bw,avx512vnni")))
    static SQD_INLINE void sqd_nib_dots8_block(const uint8_t* hi, const uint8_t* lo,
                                               Py_ssize_t dpad8, const int8_t* qw,
                                               const int8_t* qw2, __m512i* dw, __m512i* dw2) {
        const __m512i mhi = _mm512_set1_epi8((char)0xF0);
        __m512i a = _mm512_setzero_si512(), a2 = a, b = a, b2 = a;
        for (Py_ssize_t g = 0; g < dpad8 / 8; ++g) {
            int32_t q0, q1, r0, r1;
            std::memcpy(&q0, qw + 8 * g, 4);
            std::memcpy(&q1, qw + 8 * g + 4, 4);
            std::memcpy(&r0, qw2 + 8 * g, 4);
            std::memcpy(&r1, qw2 + 8 * g + 4, 4);
            __m512i vl = _mm512_loadu_si512(lo + g * 64), vh = _mm512_loadu_si512(hi + g * 64);
            /* mhi ? x : y, bit by bit (ternary-logic table 0xCA) */
            __m512i u0 = _mm512_ternarylogic_epi32(mhi, _mm512_slli_epi16(vh, 4), vl, 0xCA);
            __m512i u1 = _mm512_ternarylogic_epi32(mhi, vh, _mm512_srli_epi16(vl, 4), 0xCA);
            a = _mm512_dpbusd_epi32(a, u0, _mm512_set1_epi32(q0));
            a2 = _mm512_dpbusd_epi32(a2, u1, _mm512_set1_epi32(q1));
            b = _mm512_dpbusd_epi32(b, u0, _mm512_set1_epi32(r0));
            b2 = _mm512_dpbusd_epi32(b2, u1, _mm512_set1_epi32(r1));
        }
        *dw = _mm512_add_epi32(a, a2);
        *dw2 = _mm512_add_epi32(b, b2);
    }
    __attribute__((target("avx512f,avx512bw,avx512vnni")))
    static void sqd_nib_dots8_vnni(const uint8_t* hi, const uint8_t* lo, Py_ssize_t dpad8,
                                   const int8_t* qw, const int8_t* qw2, int32_t* out) {
        __m512i dw, dw2;
        sqd_nib_dots8_block(hi, lo, dpad8, qw, qw2, &dw, &dw2);
        _mm512_storeu_si512(out, dw);
        _mm512_storeu_si512(out + 16, dw2);
    }
    #endif

    static void sqd_nib_dots(const uint8_t* plane, Py_ssize_t nblk, Py_ssize_t dpad8,
                             const int8_t* qw, int32_t* out) {
    #if SQD_X86
        int isa = sqd_isa();
        if (isa == 2) { sqd_nib_dots_vnni(plane, nblk, dpad8, qw, out); return; }
        if (isa == 1) { sqd_nib_dots_avx2(plane, nblk, dpad8, qw, out); return; }
    #endif
        sqd_nib_dots_generic(plane, nblk, dpad8, qw, out);
    }

    /* Stage-1 dots of nblk consecutive blocks (both planes): for block k and
       slot r of it, out[32 k + r] = <u_r, qw> and out[32 k + 16 + r] =
       <u_r, qw2> with u = 16 u_hi + u_lo = q8 + 136 per feature; both are
       below 255 * 127 * 16384 < 2^31. */
    static void sqd_nib_dots8(const uint8_t* hi, const uint8_t* lo, Py_ssize_t nblk,
                              Py_ssize_t dpad8, const int8_t* qw, const int8_t* qw2,
                              int32_t* out) {
        for (Py_ssize_t k = 0; k < nblk; ++k) {
            const uint8_t* h = hi + k * 8 * dpad8;
            const uint8_t* l = lo + k * 8 * dpad8;
            int32_t* o = out + 32 * k;
            if (nblk > 1) {
                sqd_stream_ahead(h, 8 * dpad8);
                sqd_stream_ahead(l, 8 * dpad8);
            }
    #if SQD_X86
            if (sqd_isa() == 2) { sqd_nib_dots8_vnni(h, l, dpad8, qw, qw2, o); continue; }
    #endif
            int32_t t[32];
            sqd_nib_dots(h, 1, dpad8, qw, o);
            sqd_nib_dots(h, 1, dpad8, qw2, o + 16);
            sqd_nib_dots(l, 1, dpad8, qw, t);
            sqd_nib_dots(l, 1, dpad8, qw2, t + 16);
            for (int r = 0; r < 32; ++r) o[r] = 16 * o[r] + t[r];
        }
    }

    /* Stage-2 dots of one point-major nibble row (dpad8 / 2 bytes): byte i
       holds feature i in its low nibble and feature i + dpad8 / 2 in its
       high nibble (u = q + 8).  *o1 = <u, qw>, *o2 = <u, qw2>, exact in
       int32 for d <= 16384. */
    static void sqd_row3_dots_generic(const uint8_t* row, Py_ssize_t dpad8, const int8_t* qw,
                                      const int8_t* qw2, int32_t* o1, int32_t* o2) {
        const Py_ssize_t half = dpad8 / 2;
        int32_t a = 0, b = 0;
        for (Py_ssize_t i = 0; i < half; ++i) {
            int32_t lo = row[i] & 15, hi = row[i] >> 4;
            a += lo * (int32_t)qw[i] + hi * (int32_t)qw[i + half];
            b += lo * (int32_t)qw2[i] + hi * (int32_t)qw2[i + half];
        }
        *o1 = a;
        *o2 = b;
    }

    #if SQD_X86
    __attribute__((target("avx512f,avx512bw,avx512vnni")))
    static void sqd_row3_dots_vnni(const uint8_t* row, Py_ssize_t dpad8, const int8_t* qw,
                                   const int8_t* qw2, int32_t* o1, int32_t* o2) {
        const Py_ssize_t half = dpad8 / 2;
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        __m512i a = _mm512_setzero_si512(), b = a;
        for (Py_ssize_t i = 0; i < half; i += 64) {
            /* masked loads read zeros past the row and past the query */
            __mmask64 k = half - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (half - i)) - 1);
            __m512i v = _mm512_maskz_loadu_epi8(k, row + i);
            __m512i lo = _mm512_and_si512(v, m4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            a = _mm512_dpbusd_epi32(a, lo, _mm512_maskz_loadu_epi8(k, qw + i));
            a = _mm512_dpbusd_epi32(a, hi, _mm512_maskz_loadu_epi8(k, qw + half + i));
            b = _mm512_dpbusd_epi32(b, lo, _mm512_maskz_loadu_epi8(k, qw2 + i));
            b = _mm512_dpbusd_epi32(b, hi, _mm512_maskz_loadu_epi8(k, qw2 + half + i));
        }
        *o1 = _mm512_reduce_add_epi32(a);
        *o2 = _mm512_reduce_add_epi32(b);
    }
    #endif

    static void sqd_row3_dots(const uint8_t* row, Py_ssize_t dpad8, const int8_t* qw,
                              const int8_t* qw2, int32_t* o1, int32_t* o2) {
    #if SQD_X86
        if (sqd_isa() == 2) { sqd_row3_dots_vnni(row, dpad8, qw, qw2, o1, o2); return; }
    #endif
        sqd_row3_dots_generic(row, dpad8, qw, qw2, o1, o2);
    }

    /* Nibble dots of the whole blocks covering slots [s0, s1), s1 - s0 <=
       256, into out (up to 272 entries); returns the position of slot s0. */
    static Py_ssize_t sqd_nib_range_dots(const uint8_t* plane, Py_ssize_t dpad8, Py_ssize_t s0,
                                         Py_ssize_t s1, const int8_t* qw, int32_t* out) {
        Py_ssize_t b0 = s0 >> 4, b1 = ((s1 - 1) >> 4) + 1;
        sqd_nib_dots(plane + b0 * 8 * dpad8, b1 - b0, dpad8, qw, out);
        return s0 - b0 * 16;
    }

    /* Integer screening: of dots[0..n), positions with dots >= hi go to acc,
       those in [lo, hi) to ver (those below lo are rejected); acc and ver
       need 16 entries of slack. */
    static void sqd_screen_int_generic(const int32_t* dots, Py_ssize_t n, int32_t hi,
                                       int32_t lo, int32_t* acc, Py_ssize_t* n_acc,
                                       int32_t* ver, Py_ssize_t* n_ver) {
        Py_ssize_t a = 0, v = 0;
        for (Py_ssize_t i = 0; i < n; ++i) {
            int32_t x = dots[i];
            acc[a] = (int32_t)i; a += (x >= hi);
            ver[v] = (int32_t)i; v += (x < hi) & (x >= lo);
        }
        *n_acc = a;
        *n_ver = v;
    }

    #if SQD_X86
    __attribute__((target("avx512f,popcnt")))
    static void sqd_screen_int_avx512(const int32_t* dots, Py_ssize_t n, int32_t hi,
                                      int32_t lo, int32_t* acc, Py_ssize_t* n_acc,
                                      int32_t* ver, Py_ssize_t* n_ver) {
        const __m512i vhi = _mm512_set1_epi32(hi), vlo = _mm512_set1_epi32(lo);
        const __m512i step = _mm512_set1_epi32(16);
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        Py_ssize_t na = 0, nv = 0;
        for (Py_ssize_t i = 0; i < n; i += 16) {
            __mmask16 k = (n - i >= 16) ? (__mmask16)0xFFFF
                                        : (__mmask16)((1u << (n - i)) - 1);
            __m512i x = _mm512_maskz_loadu_epi32(k, dots + i);
            __mmask16 ma = _mm512_mask_cmpge_epi32_mask(k, x, vhi);
            __mmask16 mv = _mm512_mask_cmpge_epi32_mask((__mmask16)(k & ~ma), x, vlo);
            _mm512_storeu_si512(acc + na, _mm512_maskz_compress_epi32(ma, idx));
            _mm512_storeu_si512(ver + nv, _mm512_maskz_compress_epi32(mv, idx));
            na += __builtin_popcount((unsigned)ma);
            nv += __builtin_popcount((unsigned)mv);
            idx = _mm512_add_epi32(idx, step);
        }
        *n_acc = na;
        *n_ver = nv;
    }
    #endif

    static void sqd_screen_int(const int32_t* dots, Py_ssize_t n, int32_t hi, int32_t lo,
                               int32_t* acc, Py_ssize_t* n_acc, int32_t* ver,
                               Py_ssize_t* n_ver) {
    #if SQD_X86
        if (sqd_isa() == 2) {
            sqd_screen_int_avx512(dots, n, hi, lo, acc, n_acc, ver, n_ver);
            return;
        }
    #endif
        sqd_screen_int_generic(dots, n, hi, lo, acc, n_acc, ver, n_ver);
    }

    /* Stage-1 decisions of the relative codes for n slots (ascending, in
       blocks b0..): slot s has the block dots o[32 k + r] = <u, qw> and
       o[32 k + 16 + r] = <u, qw2> (k = (s >> 4) - b0, r = s & 15; the +136
       offsets of u are removed with sub, sub2), and F = K (o[32 k + r] -
       sub) + (o[32 k + 16 + r] - sub2) = <q8, K qw + qw2>.  F >= hi: slot -
       base goes to acc; lo <= F < hi: slot goes to ver and F to ver_f (an
       integer, exact in float64).  acc, ver and ver_f need 16 entries of
       slack. */
    static SQD_INLINE void sqd_stage1_step(Py_ssize_t s, const int32_t* o, Py_ssize_t b0,
                                           int32_t sub, int32_t sub2, int64_t K, int64_t hi,
                                           int64_t lo, Py_ssize_t base, int32_t* acc,
                                           Py_ssize_t* a, Py_ssize_t* ver, double* ver_f,
                                           Py_ssize_t* v) {
        const int32_t* ob = o + 32 * ((s >> 4) - b0) + (s & 15);
        int64_t e = K * (int64_t)(ob[0] - sub) + (int64_t)(ob[16] - sub2);
        acc[*a] = (int32_t)(s - base);
        *a += e >= hi;
        ver[*v] = s;
        ver_f[*v] = (double)e;
        *v += (e < hi) & (e >= lo);
    }
    static void sqd_stage1_generic(const Py_ssize_t* slot, Py_ssize_t n, const int32_t* o,
                                   Py_ssize_t b0, int32_t sub, int32_t sub2, int64_t K,
                                   int64_t hi, int64_t lo, Py_ssize_t base, int32_t* acc,
                                   Py_ssize_t* n_acc, Py_ssize_t* ver, double* ver_f,
                                   Py_ssize_t* n_ver) {
        Py_ssize_t a = 0, v = *n_ver;
        for (Py_ssize_t i = 0; i < n; ++i)
            sqd_stage1_step(slot[i], o, b0, sub, sub2, K, hi, lo, base, acc, &a, ver, ver_f, &v);
        *n_acc = a;
        *n_ver = v;
    }

    #if SQD_X86
    /* The same, 8 slots per step: both differences are below 2^29 and F
       below 2^37, so float64 holds all of them exactly (the fused
       multiply-add rounds once, an exact result).  One step decides the
       slots sl (lanes in k) from their dots p1, p2. */
    __attribute__((target("avx512f,avx512vl,avx512dq,popcnt")))
    static SQD_INLINE void sqd_stage1_step8(__mmask8 k, __m512i sl, __m256i p1, __m256i p2,
                                            int32_t sub, int32_t sub2, int64_t K, int64_t hi,
                                            int64_t lo, Py_ssize_t base, int32_t* acc,
                                            Py_ssize_t* a, Py_ssize_t* ver, double* ver_f,
                                            Py_ssize_t* v) {
        __m512d e = _mm512_fmadd_pd(
            _mm512_set1_pd((double)K),
            _mm512_cvtepi32_pd(_mm256_sub_epi32(p1, _mm256_set1_epi32(sub))),
            _mm512_cvtepi32_pd(_mm256_sub_epi32(p2, _mm256_set1_epi32(sub2))));
        __mmask8 ma = _mm512_mask_cmp_pd_mask(k, e, _mm512_set1_pd((double)hi), _CMP_GE_OQ);
        __mmask8 mv = _mm512_mask_cmp_pd_mask((__mmask8)(k & ~ma), e,
                                              _mm512_set1_pd((double)lo), _CMP_GE_OQ);
        __m256i rel = _mm512_cvtepi64_epi32(_mm512_sub_epi64(sl, _mm512_set1_epi64(base)));
        _mm256_storeu_si256((__m256i*)(acc + *a), _mm256_maskz_compress_epi32(ma, rel));
        _mm512_storeu_si512(ver + *v, _mm512_maskz_compress_epi64(mv, sl));
        _mm512_storeu_pd(ver_f + *v, _mm512_maskz_compress_pd(mv, e));
        *a += __builtin_popcount((unsigned)ma);
        *v += __builtin_popcount((unsigned)mv);
    }

    __attribute__((target("avx512f,avx512vl,avx512dq,popcnt")))
    static void sqd_stage1_avx512(const Py_ssize_t* slot, Py_ssize_t n, const int32_t* o,
                                  Py_ssize_t b0, int32_t sub, int32_t sub2, int64_t K,
                                  int64_t hi, int64_t lo, Py_ssize_t base, int32_t* acc,
                                  Py_ssize_t* n_acc, Py_ssize_t* ver, double* ver_f,
                                  Py_ssize_t* n_ver) {
        const __m512i vb0 = _mm512_set1_epi64(b0), v15 = _mm512_set1_epi64(15);
        const __m256i v16 = _mm256_set1_epi32(16);
        Py_ssize_t a = 0, v = *n_ver;
        for (Py_ssize_t i = 0; i < n; i += 8) {
            __mmask8 k = (n - i >= 8) ? (__mmask8)0xFF : (__mmask8)((1u << (n - i)) - 1);
            __m512i sl = _mm512_maskz_loadu_epi64(k, slot + i);
            __m512i blk = _mm512_sub_epi64(_mm512_srli_epi64(sl, 4), vb0);
            __m512i idx64 = _mm512_add_epi64(_mm512_slli_epi64(blk, 5),
                                             _mm512_and_si512(sl, v15));
            __m256i idx = _mm512_cvtepi64_epi32(idx64);
            __m256i z = _mm256_setzero_si256();
            __m256i p1 = _mm256_mmask_i32gather_epi32(z, k, idx, o, 4);
            __m256i p2 = _mm256_mmask_i32gather_epi32(z, k, _mm256_add_epi32(idx, v16), o, 4);
            sqd_stage1_step8(k, sl, p1, p2, sub, sub2, K, hi, lo, base, acc, &a, ver, ver_f, &v);
        }
        *n_acc = a;
        *n_ver = v;
    }
    #endif

    #if SQD_X86
    /* Whether the AVX-512 stage-1 decisions run (VNNI level, VL and DQ). */
    static bool sqd_stage1_vec(void) {
        static const bool vl = __builtin_cpu_supports("avx512vl")
                               && __builtin_cpu_supports("avx512dq");
        return sqd_isa() == 2 && vl;
    }
    #endif

    static void sqd_stage1(const Py_ssize_t* slot, Py_ssize_t n, const int32_t* o,
                           Py_ssize_t b0, int32_t sub, int32_t sub2, int64_t K, int64_t hi,
                           int64_t lo, Py_ssize_t base, int32_t* acc, Py_ssize_t* n_acc,
                           Py_ssize_t* ver, double* ver_f, Py_ssize_t* n_ver) {
    #if SQD_X86
        if (sqd_stage1_vec()) {
            sqd_stage1_avx512(slot, n, o, b0, sub, sub2, K, hi, lo, base, acc, n_acc, ver,
                              ver_f, n_ver);
            return;
        }
    #endif
        sqd_stage1_generic(slot, n, o, b0, sub, sub2, K, hi, lo, base, acc, n_acc, ver, ver_f,
                           n_ver);
    }

    /* Stage-1 decisions of the n contiguous slots s0 .. s0 + n - 1 (as
       sqd_stage1, whose slot list they would be): the block dots start at
       block s0 >> 4. */
    static void sqd_stage1_dense_generic(Py_ssize_t s0, Py_ssize_t n, const int32_t* o,
                                         int32_t sub, int32_t sub2, int64_t K, int64_t hi,
                                         int64_t lo, Py_ssize_t base, int32_t* acc,
                                         Py_ssize_t* n_acc, Py_ssize_t* ver, double* ver_f,
                                         Py_ssize_t* n_ver) {
        Py_ssize_t a = 0, v = *n_ver;
        for (Py_ssize_t s = s0; s < s0 + n; ++s)
            sqd_stage1_step(s, o, s0 >> 4, sub, sub2, K, hi, lo, base, acc, &a, ver, ver_f, &v);
        *n_acc = a;
        *n_ver = v;
    }

    #if SQD_X86
    /* Stage 1 of the n contiguous slots s0 .. s0 + n - 1 in one pass: each
       block's dots (as sqd_nib_dots8_vnni, with hi and lo at the block of
       s0) are decided (as sqd_stage1_dense_generic) while in registers. */
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,popcnt")))
    static void sqd_stage1_fused_vnni(const uint8_t* hi, const uint8_t* lo, Py_ssize_t dpad8,
                                      Py_ssize_t s0, Py_ssize_t n, const int8_t* qw,
                                      const int8_t* qw2, int32_t sub, int32_t sub2, int64_t K,
                                      int64_t thi, int64_t tlo, Py_ssize_t base, int32_t* acc,
                                      Py_ssize_t* n_acc, Py_ssize_t* ver, double* ver_f,
                                      Py_ssize_t* n_ver) {
        const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
        Py_ssize_t a = 0, v = *n_ver, e1 = s0 + n, b0 = s0 >> 4, b1 = ((e1 - 1) >> 4) + 1;
        for (Py_ssize_t blk = b0; blk < b1; ++blk) {
            __m512i dw, dw2;
            if (b1 - b0 > 1) {
                sqd_stream_ahead(hi + (blk - b0) * 8 * dpad8, 8 * dpad8);
                sqd_stream_ahead(lo + (blk - b0) * 8 * dpad8, 8 * dpad8);
            }
            sqd_nib_dots8_block(hi + (blk - b0) * 8 * dpad8, lo + (blk - b0) * 8 * dpad8, dpad8,
                                qw, qw2, &dw, &dw2);
            for (int h = 0; h < 2; ++h) {
                Py_ssize_t g = 16 * blk + 8 * h;
                unsigned m = 0xFF;
                if (g < s0) m = g + 8 <= s0 ? 0u : m & (0xFFu << (s0 - g));
                if (g + 8 > e1) m = g >= e1 ? 0u : m & (0xFFu >> (g + 8 - e1));
                if (!m) continue;
                __m256i p1 = h ? _mm512_extracti64x4_epi64(dw, 1) : _mm512_castsi512_si256(dw);
                __m256i p2 = h ? _mm512_extracti64x4_epi64(dw2, 1) : _mm512_castsi512_si256(dw2);
                __m512i sl = _mm512_add_epi64(_mm512_set1_epi64(g), step);
                sqd_stage1_step8((__mmask8)m, sl, p1, p2, sub, sub2, K, thi, tlo, base, acc, &a,
                                 ver, ver_f, &v);
            }
        }
        *n_acc = a;
        *n_ver = v;
    }
    #endif

    /* Stage 1 of the n contiguous slots s0 .. s0 + n - 1 (a whole chunk
       that skipped stage 0): the planes hi and lo start at the block of s0;
       dots is scratch for 32 entries per block (unused by the fused
       kernel).  Outputs as sqd_stage1. */
    static void sqd_stage1_whole(const uint8_t* hi, const uint8_t* lo, Py_ssize_t dpad8,
                                 Py_ssize_t s0, Py_ssize_t n, const int8_t* qw,
                                 const int8_t* qw2, int32_t* dots, int32_t sub, int32_t sub2,
                                 int64_t K, int64_t thi, int64_t tlo, Py_ssize_t base,
                                 int32_t* acc, Py_ssize_t* n_acc, Py_ssize_t* ver,
                                 double* ver_f, Py_ssize_t* n_ver) {
    #if SQD_X86
        if (sqd_stage1_vec()) {
            sqd_stage1_fused_vnni(hi, lo, dpad8, s0, n, qw, qw2, sub, sub2, K, thi, tlo, base,
                                  acc, n_acc, ver, ver_f, n_ver);
            return;
        }
    #endif
        sqd_nib_dots8(hi, lo, ((s0 + n - 1) >> 4) - (s0 >> 4) + 1, dpad8, qw, qw2, dots);
        sqd_stage1_dense_generic(s0, n, dots, sub, sub2, K, thi, tlo, base, acc, n_acc, ver,
                                 ver_f, n_ver);
    }

    /* float32 variant of sqd_classify, twice as wide per vector.  Used only
       when the query's constants are safely inside the float32 range (see
       _prepare_query); every rounding (at most a few ulps of 2^-24 relative
       on each term of the approximation, including the int32 -> float32
       conversions of the dots and the rounding of t and t2 to float32) is
       covered by rel = 1e-6 times the sum of the terms' magnitudes,
       underflow (even flushed to zero) by tiny, and b is rounded outwards
       (b_up for accepting, b_dn for rejecting). */
    __attribute__((target_clones("avx512f", "avx2", "default")))
    static void sqd_classify_f32(const int32_t* dots, const int32_t* dots2, int32_t sub1,
                                 int32_t sub2, Py_ssize_t n, const float* scale,
                                 const float* ea, const float* ec, float t, float t2,
                                 float A, float C, float b_up, float b_dn, float rel,
                                 float tiny, unsigned char* flag) {
        const float one_rel = 1.0f + rel;
        for (Py_ssize_t i = 0; i < n; ++i) {
            float x1 = t * (float)(dots[i] - sub1), x2 = t2 * (float)(dots2[i] - sub2);
            float approx = scale[i] * (x1 + x2);
            float mag = scale[i] * ((x1 < 0 ? -x1 : x1) + (x2 < 0 ? -x2 : x2));
            float m = (ea[i] * A + ec[i] * C) * one_rel + rel * mag + tiny;
            unsigned char acc = (approx - m >= b_up) ? 2 : 0;
            unsigned char rej = (approx + m < b_dn) ? 1 : 0;
            flag[i] = acc | (unsigned char)(1 - rej - (acc >> 1));
        }
    }

    /* Prefetch the rows about to be verified (turns a latency-bound loop of
       scattered row reads into a bandwidth-bound one). */
    static inline void sqd_prefetch_rows(const char* rows, Py_ssize_t row_bytes,
                                         Py_ssize_t s0, const int32_t* pos, Py_ssize_t n) {
    #if defined(__GNUC__)
        for (Py_ssize_t i = 0; i < n; ++i) {
            const char* r = rows + (s0 + pos[i]) * row_bytes;
            for (Py_ssize_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(r + o);
        }
    #endif
    }

    /* Prefetch every cache line touched by [p, p + n), n > 0. */
    static inline void sqd_prefetch_span(const char* p, Py_ssize_t n) {
    #if defined(__GNUC__)
        const uintptr_t end = (uintptr_t)(p + n - 1);
        for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a <= end; a += 64)
            __builtin_prefetch((const char*)a);
    #endif
    }

    static inline void sqd_prefetch_row(const char* row, Py_ssize_t row_bytes) {
    #if defined(__GNUC__)
        for (Py_ssize_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(row + o);
    #endif
    }

    /* Prefetch into L2 only (does not hold an L1 miss buffer). */
    static inline void sqd_prefetch_span_l2(const char* p, Py_ssize_t n) {
    #if defined(__GNUC__)
        const uintptr_t end = (uintptr_t)(p + n - 1);
        for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a <= end; a += 64)
            __builtin_prefetch((const char*)a, 0, 2);
    #endif
    }

    /* Positions of the accepted (flag 2) and undecided (flag 1) points of a
       chunk, branch-free; runs of eight rejected points are skipped. */
    static void sqd_split_flags(const unsigned char* flag, Py_ssize_t n, int32_t* acc,
                                Py_ssize_t* n_acc, int32_t* ver, Py_ssize_t* n_ver) {
        Py_ssize_t a = 0, v = 0, i = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t word;
            std::memcpy(&word, flag + i, 8);
            if (word == 0) continue;
            for (Py_ssize_t k = i; k < i + 8; ++k) {
                unsigned char f = flag[k];
                acc[a] = (int32_t)k; a += (f == 2);
                ver[v] = (int32_t)k; v += (f == 1);
            }
        }
        for (; i < n; ++i) {
            unsigned char f = flag[i];
            acc[a] = (int32_t)i; a += (f == 2);
            ver[v] = (int32_t)i; v += (f == 1);
        }
        *n_acc = a;
        *n_ver = v;
    }

    #if SQD_X86
    /* sqd_classify_f32 and sqd_split_flags fused, 16 points per step (same
       arithmetic; the positions are compressed in registers, since the
       memory form of vpcompressd is slow on some CPUs).  acc and ver need
       16 entries of slack. */
    __attribute__((target("avx512f,popcnt")))
    static void sqd_screen_f32_avx512(const int32_t* dots, const int32_t* dots2,
                                      int32_t sub1, int32_t sub2,
                                      Py_ssize_t n, const float* scale, const float* ea,
                                      const float* ec, float t, float t2, float A, float C,
                                      float b_up, float b_dn, float rel, float tiny,
                                      int32_t* acc, Py_ssize_t* n_acc, int32_t* ver,
                                      Py_ssize_t* n_ver) {
        const __m512 vt = _mm512_set1_ps(t), vt2 = _mm512_set1_ps(t2);
        const __m512 vA = _mm512_set1_ps(A), vC = _mm512_set1_ps(C);
        const __m512 vone_rel = _mm512_set1_ps(1.0f + rel), vrel = _mm512_set1_ps(rel);
        const __m512 vtiny = _mm512_set1_ps(tiny);
        const __m512 vb_up = _mm512_set1_ps(b_up), vb_dn = _mm512_set1_ps(b_dn);
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        const __m512i vs1 = _mm512_set1_epi32(sub1), vs2 = _mm512_set1_epi32(sub2);
        Py_ssize_t na = 0, nv = 0;
        for (Py_ssize_t i = 0; i < n; i += 16) {
            __mmask16 k = (n - i >= 16) ? (__mmask16)0xFFFF
                                        : (__mmask16)((1u << (n - i)) - 1);
            __m512 d1 = _mm512_cvtepi32_ps(
                _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, dots + i), vs1));
            __m512 d2 = _mm512_cvtepi32_ps(
                _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, dots2 + i), vs2));
            __m512 sc = _mm512_maskz_loadu_ps(k, scale + i);
            __m512 a = _mm512_maskz_loadu_ps(k, ea + i);
            __m512 c = _mm512_maskz_loadu_ps(k, ec + i);
            __m512 x1 = _mm512_mul_ps(vt, d1), x2 = _mm512_mul_ps(vt2, d2);
            __m512 approx = _mm512_mul_ps(sc, _mm512_add_ps(x1, x2));
            __m512 mag = _mm512_mul_ps(sc, _mm512_add_ps(_mm512_abs_ps(x1), _mm512_abs_ps(x2)));
            __m512 m = _mm512_add_ps(
                _mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(a, vA),
                                                          _mm512_mul_ps(c, vC)), vone_rel),
                              _mm512_mul_ps(vrel, mag)), vtiny);
            __mmask16 macc = _mm512_mask_cmp_ps_mask(k, _mm512_sub_ps(approx, m), vb_up,
                                                     _CMP_GE_OQ);
            __mmask16 mrej = _mm512_cmp_ps_mask(_mm512_add_ps(approx, m), vb_dn, _CMP_LT_OQ);
            __mmask16 mver = (__mmask16)(k & ~macc & ~mrej);
            _mm512_storeu_si512(acc + na, _mm512_maskz_compress_epi32(macc, idx));
            _mm512_storeu_si512(ver + nv, _mm512_maskz_compress_epi32(mver, idx));
            na += __builtin_popcount((unsigned)macc);
            nv += __builtin_popcount((unsigned)mver);
            idx = _mm512_add_epi32(idx, step);
        }
        *n_acc = na;
        *n_ver = nv;
    }
    #endif

    /* Screening decisions of n points in float32 (see sqd_classify_f32), as
       positions of the accepted (acc) and undecided (ver) points; flag is
       scratch (n + 8 bytes); acc and ver need 16 entries of slack. */
    static void sqd_screen_f32(const int32_t* dots, const int32_t* dots2, int32_t sub1,
                               int32_t sub2, Py_ssize_t n,
                               const float* scale, const float* ea, const float* ec,
                               float t, float t2, float A, float C, float b_up, float b_dn,
                               float rel, float tiny, unsigned char* flag, int32_t* acc,
                               Py_ssize_t* n_acc, int32_t* ver, Py_ssize_t* n_ver) {
    #if SQD_X86
        if (sqd_isa() == 2) {
            sqd_screen_f32_avx512(dots, dots2, sub1, sub2, n, scale, ea, ec, t, t2, A, C,
                                  b_up, b_dn, rel, tiny, acc, n_acc, ver, n_ver);
            return;
        }
    #endif
        sqd_classify_f32(dots, dots2, sub1, sub2, n, scale, ea, ec, t, t2, A, C, b_up, b_dn,
                         rel, tiny, flag);
        sqd_split_flags(flag, n, acc, n_acc, ver, n_ver);
    }

    /* Classify n points from their integer dots: flag 2 = surely
       score >= b, 0 = surely score < b, 1 = undecided (verify; also every
       tombstone, whose ea is NaN).  The approximation is
       scale (t dots + t2 dots2); rel times the magnitudes of its terms
       covers its rounding.  Branch-free so that it vectorises. */
    SQD_CLONES
    static void sqd_classify(const int32_t* dots, const int32_t* dots2, int32_t sub1,
                             int32_t sub2, Py_ssize_t n, const float* scale,
                             const float* ea, const float* ec, double t, double t2,
                             double A, double C, double b, double rel, double tiny,
                             unsigned char* flag) {
        const double one_rel = 1.0 + rel;
        for (Py_ssize_t i = 0; i < n; ++i) {
            double x1 = t * (double)(dots[i] - sub1), x2 = t2 * (double)(dots2[i] - sub2);
            double approx = (double)scale[i] * (x1 + x2);
            double mag = (double)scale[i] * ((x1 < 0 ? -x1 : x1) + (x2 < 0 ? -x2 : x2));
            double m = ((double)ea[i] * A + (double)ec[i] * C) * one_rel + rel * mag + tiny;
            unsigned char acc = (approx - m >= b) ? 2 : 0;
            unsigned char rej = (approx + m < b) ? 1 : 0;
            /* accept -> 2, reject -> 0, neither (or NaN) -> 1 */
            flag[i] = acc | (unsigned char)(1 - rej - (acc >> 1));
        }
    }

    /* The sum of eight partial sums, in the one fixed order every kernel
       uses (so that vectorised and generic versions agree bit for bit). */
    static SQD_INLINE double sqd_fold8(const double* s) {
        return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    }

    /* Dot products accumulated in float64 with eight independent partial
       sums (vectorisable without -ffast-math); any summation order obeys
       the gamma_d bound of the design notes. */
    template <typename T>
    static SQD_INLINE double sqd_dot_impl(const T* a, const double* b, Py_ssize_t d) {
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        Py_ssize_t j = 0;
        for (; j + 8 <= d; j += 8)
            for (int k = 0; k < 8; ++k) s[k] += (double)a[j + k] * b[j + k];
        for (; j < d; ++j) s[0] += (double)a[j] * b[j];
        return sqd_fold8(s);
    }
    SQD_CLONES
    static double sqd_xdot(const float* a, const double* b, Py_ssize_t d) {
        return sqd_dot_impl<float>(a, b, d);
    }
    SQD_CLONES
    static double sqd_xdot(const double* a, const double* b, Py_ssize_t d) {
        return sqd_dot_impl<double>(a, b, d);
    }

    /* The two code levels of _encode_point, in loops the compiler
       vectorises.  Rounding: every quotient here is at most 127 (1 +
       2^-23) in magnitude (the scale is the largest magnitude / 127,
       rounded to float32), so adding and subtracting 1.5 * 2^52 rounds it
       to an integer exactly as nearbyint does (half to even).  The sums of
       squares use eight partial sums: q^2 sums are exact, and any order of
       the e^2 sums is covered by the INFL widening of the constants. */
    static SQD_INLINE double sqd_code127(double x, double s) {
        double q = (x / s + 6755399441055744.0) - 6755399441055744.0;
        return q > 127.0 ? 127.0 : (q < -127.0 ? -127.0 : q);
    }
    /* One feature of level 1: writes q + 128, adds q^2 and e^2 to *a, *b
       and keeps the largest |e| in *m (e = x - s q; s q is exact: 24 + 7
       bits). */
    static SQD_INLINE void sqd_level1_step(double x, double s, uint8_t* q_out, double* a,
                                           double* b, double* m) {
        const double q = sqd_code127(x, s);
        const double e = x - s * q;
        *q_out = (uint8_t)(int)(q + 128.0);
        *a += q * q;
        *b += e * e;
        *m = std::fabs(e) > *m ? std::fabs(e) : *m;
    }
    /* One feature of level 2, in place: *q holds the level-1 code + 128 on
       entry and the level-2 code of e = x - s1 q1 at scale s2 on exit;
       adds the squared residual to *b. */
    static SQD_INLINE void sqd_level2_step(double x, double s1, double s2, uint8_t* q,
                                           double* b) {
        const double e = x - s1 * (double)((int)*q - 128);
        const double q2 = sqd_code127(e, s2);
        const double e2 = e - s2 * q2;
        *q = (uint8_t)(int)(q2 + 128.0);
        *b += e2 * e2;
    }
    template <typename T>
    static SQD_INLINE void sqd_encode_level1_impl(const T* p, Py_ssize_t d, double s,
                                                  uint8_t* q_out, double* qn2, double* en2,
                                                  double* maxe) {
        double a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        double m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        Py_ssize_t j = 0;
        for (; j + 8 <= d; j += 8)
            for (int k = 0; k < 8; ++k)
                sqd_level1_step((double)p[j + k], s, q_out + j + k, a + k, b + k, m + k);
        for (; j < d; ++j)
            sqd_level1_step((double)p[j], s, q_out + j, a, b, m);
        double mx = 0;
        for (int k = 0; k < 8; ++k) mx = m[k] > mx ? m[k] : mx;
        *qn2 = sqd_fold8(a);
        *en2 = sqd_fold8(b);
        *maxe = mx;
    }
    /* Level 2 in place over the codes written by level 1; returns the sum
       of the squared residuals e - s2 q2. */
    template <typename T>
    static SQD_INLINE double sqd_encode_level2_impl(const T* p, Py_ssize_t d, double s1,
                                                    double s2, uint8_t* q) {
        double b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        Py_ssize_t j = 0;
        for (; j + 8 <= d; j += 8)
            for (int k = 0; k < 8; ++k)
                sqd_level2_step((double)p[j + k], s1, s2, q + j + k, b + k);
        for (; j < d; ++j)
            sqd_level2_step((double)p[j], s1, s2, q + j, b);
        return ((b[0] + b[4]) + (b[1] + b[5])) + ((b[2] + b[6]) + (b[3] + b[7]));
    }
    SQD_CLONES
    static void sqd_encode_level1(const float* p, Py_ssize_t d, double s, uint8_t* q_out,
                                  double* qn2, double* en2, double* maxe) {
        sqd_encode_level1_impl<float>(p, d, s, q_out, qn2, en2, maxe);
    }
    SQD_CLONES
    static void sqd_encode_level1(const double* p, Py_ssize_t d, double s, uint8_t* q_out,
                                  double* qn2, double* en2, double* maxe) {
        sqd_encode_level1_impl<double>(p, d, s, q_out, qn2, en2, maxe);
    }
    SQD_CLONES
    static double sqd_encode_level2(const float* p, Py_ssize_t d, double s1, double s2,
                                    uint8_t* q) {
        return sqd_encode_level2_impl<float>(p, d, s1, s2, q);
    }
    SQD_CLONES
    static double sqd_encode_level2(const double* p, Py_ssize_t d, double s1, double s2,
                                    uint8_t* q) {
        return sqd_encode_level2_impl<double>(p, d, s1, s2, q);
    }

    /* ---- leaf-relative codes of one point (see _rel_codes) ------------
       One group of 8 features at a time: their codes are computed first
       (branch-free, vectorisable), then stored as whole bytes: a byte of a
       nibble plane holds features j and j + 4 of the same slot, so no byte
       is read back.  sums[0..7) receives sum qh^2, q8^2, q12^2, ||e0||^2,
       ||e1||^2, ||e2||^2 and ||r||^2 (eight partial sums each). */
    template <typename T, bool FULL>
    static SQD_INLINE void sqd_rel_group(const T* __restrict p, const float* __restrict c,
                                         Py_ssize_t j0, Py_ssize_t d, double s4, double s8,
                                         double s12, int32_t* __restrict vh,
                                         int32_t* __restrict vl, int32_t* __restrict v3,
                                         double (* __restrict acc)[8]) {
        const double magic = 6755399441055744.0;   /* 1.5 * 2**52: rounds half to even */
        double r[8], y[8];
        int32_t q12[8], q8[8], qh[8];
        /* simple loops of 8, one step each, so that they vectorise */
        for (int q = 0; q < 8; ++q)
            r[q] = (FULL || j0 + q < d) ? (double)p[j0 + q] - (double)c[j0 + q] : 0.0;
        for (int q = 0; q < 8; ++q) {
            double t = r[q] / s12;
            t = t > 1911.0 ? 1911.0 : t;
            y[q] = t < -1911.0 ? -1911.0 : t;
        }
        for (int q = 0; q < 8; ++q) q12[q] = (int32_t)((y[q] + magic) - magic);
        /* floors of non-negative integers (|q12| <= 1911, |q8| <= 119) */
        for (int q = 0; q < 8; ++q) q8[q] = ((q12[q] + 8 + 4096) >> 4) - 256;
        for (int q = 0; q < 8; ++q) qh[q] = ((q8[q] + 8 + 4096) >> 4) - 256;
        for (int q = 0; q < 8; ++q) {
            vh[q] = qh[q] + 8;
            vl[q] = q8[q] - 16 * qh[q] + 8;
            v3[q] = q12[q] - 16 * q8[q] + 8;
        }
        for (int q = 0; q < 8; ++q) {
            const double fh = (double)qh[q], f8 = (double)q8[q], f12 = (double)q12[q];
            const double e0 = r[q] - s4 * fh, e1 = r[q] - s8 * f8, e2 = r[q] - s12 * f12;
            acc[0][q] += fh * fh;
            acc[1][q] += f8 * f8;
            acc[2][q] += f12 * f12;
            acc[3][q] += e0 * e0;
            acc[4][q] += e1 * e1;
            acc[5][q] += e2 * e2;
            acc[6][q] += r[q] * r[q];
        }
    }
    /* The third-level nibbles v3 of features j0 .. j0 + 7 into a point-major
       row: feature j in byte j % half, high nibble if j >= half (features
       are stored in increasing order, so a high nibble's byte already holds
       its low one). */
    static SQD_INLINE void sqd_rel_row_group(uint8_t* row, Py_ssize_t j0, Py_ssize_t half,
                                             const int32_t* v3) {
        for (int q = 0; q < 8; ++q) {
            const Py_ssize_t j = j0 + q;
            if (j < half) row[j] = (uint8_t)v3[q];
            else row[j - half] = (uint8_t)((row[j - half] & 0x0F) | (v3[q] << 4));
        }
    }
    /* Where a slot's relative codes go: its bytes in the nibble planes
       start at `base` (then one 64-byte line per 8 features); its
       third-level row (NULL without stage 2) holds `half` bytes. */
    struct SqdRelPlace {
        Py_ssize_t half, base;
        uint8_t* row;
    };
    static SQD_INLINE SqdRelPlace sqd_rel_place(Py_ssize_t dpad8, Py_ssize_t slot,
                                                uint8_t* r3) {
        SqdRelPlace at;
        at.half = dpad8 / 2;
        at.base = (slot >> 4) * 8 * dpad8 + (slot & 15) * 4;
        at.row = r3 ? r3 + slot * at.half : nullptr;
        return at;
    }
    template <typename T>
    static SQD_INLINE void sqd_rel_codes_impl(const T* p, const float* c, Py_ssize_t d,
                                              Py_ssize_t dpad8, double s4, Py_ssize_t slot,
                                              uint8_t* rhi, uint8_t* rlo, uint8_t* r3,
                                              double* sums) {
        const double s8 = s4 / 16.0, s12 = s4 / 256.0;
        const SqdRelPlace at = sqd_rel_place(dpad8, slot, r3);
        const Py_ssize_t half = at.half, base = at.base;
        uint8_t* row = at.row;
        double acc[7][8];
        for (int k = 0; k < 7; ++k)
            for (int q = 0; q < 8; ++q) acc[k][q] = 0.0;
        int32_t vh[8], vl[8], v3[8];
        for (Py_ssize_t j0 = 0; j0 < dpad8; j0 += 8) {
            if (j0 + 8 <= d)
                sqd_rel_group<T, true>(p, c, j0, d, s4, s8, s12, vh, vl, v3, acc);
            else   /* padding features: r = 0, codes 0 (nibble 8) */
                sqd_rel_group<T, false>(p, c, j0, d, s4, s8, s12, vh, vl, v3, acc);
            const Py_ssize_t byte = base + (j0 >> 3) * 64;
            for (int k = 0; k < 4; ++k) {
                rhi[byte + k] = (uint8_t)(vh[k] | (vh[k + 4] << 4));
                rlo[byte + k] = (uint8_t)(vl[k] | (vl[k + 4] << 4));
            }
            if (row) sqd_rel_row_group(row, j0, half, v3);
        }
        for (int k = 0; k < 7; ++k) sums[k] = sqd_fold8(acc[k]);
    }
    SQD_CLONES
    static void sqd_rel_codes_generic(const float* p, const float* c, Py_ssize_t d,
                                      Py_ssize_t dpad8, double s4, Py_ssize_t slot,
                                      uint8_t* rhi, uint8_t* rlo, uint8_t* r3, double* sums) {
        sqd_rel_codes_impl<float>(p, c, d, dpad8, s4, slot, rhi, rlo, r3, sums);
    }
    #if SQD_X86
    /* The same for float32 points in AVX2 intrinsics, operation for operation
       (no FMA: every product and sum rounds as in the generic code, so the
       codes and the sums are bit-identical).  The compiled generic code
       kept the integer steps scalar and read its int32 arrays back as
       vectors, which stalled on store forwarding. */
    __attribute__((target("avx2")))
    static void sqd_rel_codes_f32_avx2(const float* p, const float* c, Py_ssize_t d,
                                       Py_ssize_t dpad8, double s4, Py_ssize_t slot,
                                       uint8_t* rhi, uint8_t* rlo, uint8_t* r3,
                                       double* sums) {
        const double s8 = s4 / 16.0, s12 = s4 / 256.0;
        const SqdRelPlace at = sqd_rel_place(dpad8, slot, r3);
        const Py_ssize_t half = at.half, base = at.base;
        uint8_t* row = at.row;
        const __m256d vs4 = _mm256_set1_pd(s4), vs8 = _mm256_set1_pd(s8);
        const __m256d vs12 = _mm256_set1_pd(s12);
        const __m256d lim = _mm256_set1_pd(1911.0), nlim = _mm256_set1_pd(-1911.0);
        const __m256i eight = _mm256_set1_epi32(8);
        __m256d acc[7][2];
        for (int k = 0; k < 7; ++k) acc[k][0] = acc[k][1] = _mm256_setzero_pd();
        alignas(32) int32_t v3[8];
        for (Py_ssize_t j0 = 0; j0 < dpad8; j0 += 8) {
            __m256 pf, cf;
            if (j0 + 8 <= d) {
                pf = _mm256_loadu_ps(p + j0);
                cf = _mm256_loadu_ps(c + j0);
            } else {   /* padding features: r = 0, codes 0 (nibble 8) */
                alignas(32) float tp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                alignas(32) float tc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (Py_ssize_t q = 0; q < 8 && j0 + q < d; ++q) {
                    tp[q] = p[j0 + q];
                    tc[q] = c[j0 + q];
                }
                pf = _mm256_load_ps(tp);
                cf = _mm256_load_ps(tc);
            }
            __m256d r[2], f12[2];
            r[0] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(pf)),
                                 _mm256_cvtps_pd(_mm256_castps256_ps128(cf)));
            r[1] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(pf, 1)),
                                 _mm256_cvtps_pd(_mm256_extractf128_ps(cf, 1)));
            __m128i qi[2];
            for (int h = 0; h < 2; ++h) {
                __m256d y = _mm256_div_pd(r[h], vs12);
                y = _mm256_max_pd(_mm256_min_pd(y, lim), nlim);
                f12[h] = _mm256_round_pd(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                qi[h] = _mm256_cvtpd_epi32(f12[h]);
            }
            const __m256i q12 = _mm256_set_m128i(qi[1], qi[0]);
            /* floors by arithmetic shifts */
            const __m256i q8 = _mm256_srai_epi32(_mm256_add_epi32(q12, eight), 4);
            const __m256i qh = _mm256_srai_epi32(_mm256_add_epi32(q8, eight), 4);
            const __m256i vh = _mm256_add_epi32(qh, eight);
            const __m256i vl = _mm256_add_epi32(_mm256_sub_epi32(q8, _mm256_slli_epi32(qh, 4)),
                                                eight);
            const Py_ssize_t byte = base + (j0 >> 3) * 64;
            /* byte k of a group: feature k (low nibble) and k + 4 (high) */
            __m128i bh = _mm_or_si128(_mm256_castsi256_si128(vh),
                                      _mm_slli_epi32(_mm256_extracti128_si256(vh, 1), 4));
            __m128i bl = _mm_or_si128(_mm256_castsi256_si128(vl),
                                      _mm_slli_epi32(_mm256_extracti128_si256(vl, 1), 4));
            bh = _mm_packus_epi16(_mm_packus_epi32(bh, bh), bh);
            bl = _mm_packus_epi16(_mm_packus_epi32(bl, bl), bl);
            const uint32_t wh = (uint32_t)_mm_cvtsi128_si32(bh);
            const uint32_t wl = (uint32_t)_mm_cvtsi128_si32(bl);
            std::memcpy(rhi + byte, &wh, 4);
            std::memcpy(rlo + byte, &wl, 4);
            if (row) {
                _mm256_store_si256((__m256i*)v3, _mm256_add_epi32(
                    _mm256_sub_epi32(q12, _mm256_slli_epi32(q8, 4)), eight));
                sqd_rel_row_group(row, j0, half, v3);
            }
            const __m256d fh[2] = {_mm256_cvtepi32_pd(_mm256_castsi256_si128(qh)),
                                   _mm256_cvtepi32_pd(_mm256_extracti128_si256(qh, 1))};
            const __m256d f8[2] = {_mm256_cvtepi32_pd(_mm256_castsi256_si128(q8)),
                                   _mm256_cvtepi32_pd(_mm256_extracti128_si256(q8, 1))};
            for (int h = 0; h < 2; ++h) {
                const __m256d e0 = _mm256_sub_pd(r[h], _mm256_mul_pd(vs4, fh[h]));
                const __m256d e1 = _mm256_sub_pd(r[h], _mm256_mul_pd(vs8, f8[h]));
                const __m256d e2 = _mm256_sub_pd(r[h], _mm256_mul_pd(vs12, f12[h]));
                acc[0][h] = _mm256_add_pd(acc[0][h], _mm256_mul_pd(fh[h], fh[h]));
                acc[1][h] = _mm256_add_pd(acc[1][h], _mm256_mul_pd(f8[h], f8[h]));
                acc[2][h] = _mm256_add_pd(acc[2][h], _mm256_mul_pd(f12[h], f12[h]));
                acc[3][h] = _mm256_add_pd(acc[3][h], _mm256_mul_pd(e0, e0));
                acc[4][h] = _mm256_add_pd(acc[4][h], _mm256_mul_pd(e1, e1));
                acc[5][h] = _mm256_add_pd(acc[5][h], _mm256_mul_pd(e2, e2));
                acc[6][h] = _mm256_add_pd(acc[6][h], _mm256_mul_pd(r[h], r[h]));
            }
        }
        alignas(32) double a[8];
        for (int k = 0; k < 7; ++k) {
            _mm256_store_pd(a, acc[k][0]);
            _mm256_store_pd(a + 4, acc[k][1]);
            sums[k] = sqd_fold8(a);
        }
    }
    #endif
    static void sqd_rel_codes(const float* p, const float* c, Py_ssize_t d, Py_ssize_t dpad8,
                              double s4, Py_ssize_t slot, uint8_t* rhi, uint8_t* rlo,
                              uint8_t* r3, double* sums) {
    #if SQD_X86
        if (sqd_isa() >= 1) {
            sqd_rel_codes_f32_avx2(p, c, d, dpad8, s4, slot, rhi, rlo, r3, sums);
            return;
        }
    #endif
        sqd_rel_codes_generic(p, c, d, dpad8, s4, slot, rhi, rlo, r3, sums);
    }
    SQD_CLONES
    static void sqd_rel_codes(const double* p, const float* c, Py_ssize_t d, Py_ssize_t dpad8,
                              double s4, Py_ssize_t slot, uint8_t* rhi, uint8_t* rlo,
                              uint8_t* r3, double* sums) {
        sqd_rel_codes_impl<double>(p, c, d, dpad8, s4, slot, rhi, rlo, r3, sums);
    }

    /* Four float64 lanes (GCC / Clang vector extensions: AVX2 registers in
       the AVX2 clones, SSE2 pairs in the baseline ones).  Lane arithmetic
       is plain IEEE double arithmetic, so a kernel written with them gives
       the same bits as its scalar form with the same order of operations. */
    typedef double sqd_v4d __attribute__((vector_size(32)));
    typedef float sqd_v4f __attribute__((vector_size(16)));
    static SQD_INLINE sqd_v4d sqd_load4(const double* p) {
        sqd_v4d v;
        std::memcpy(&v, p, sizeof(v));
        return v;
    }
    static SQD_INLINE sqd_v4d sqd_load4(const float* p) {
        sqd_v4f v;
        std::memcpy(&v, p, sizeof(v));
        return __builtin_convertvector(v, sqd_v4d);
    }
    static SQD_INLINE void sqd_store4(double* p, sqd_v4d v) { std::memcpy(p, &v, sizeof(v)); }

    /* ---- builder kernels ------------------------------------------------
       The passes of a tree build over a node's points, compiled for AVX2
       and baseline.  Every float64 sum runs on eight independent partial
       sums (vectorisable without -ffast-math); any summation order obeys
       the rounding covers of the design notes (radii are rounded up by
       INFL, which covers every order). */
    template <typename T, typename C>
    static SQD_INLINE double sqd_dist2_impl(const T* x, const C* c, Py_ssize_t d) {
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        Py_ssize_t j = 0;
        for (; j + 8 <= d; j += 8)
            for (int k = 0; k < 8; ++k) {
                double t = (double)x[j + k] - (double)c[j + k];
                s[k] += t * t;
            }
        for (; j < d; ++j) {
            double t = (double)x[j] - (double)c[j];
            s[0] += t * t;
        }
        return sqd_fold8(s);
    }

    /* The farthest row from row `from` among perm[start], perm[start + step],
       ... (< end); ties keep the first. */
    template <typename T>
    static SQD_INLINE Py_ssize_t sqd_farthest_impl(const T* X, Py_ssize_t d,
                                                   const Py_ssize_t* perm, Py_ssize_t from,
                                                   Py_ssize_t start, Py_ssize_t end,
                                                   Py_ssize_t step) {
        Py_ssize_t best = perm[start];
        double bd = -1.0;
        for (Py_ssize_t k = start; k < end; k += step) {
            double t = sqd_dist2_impl<T, T>(X + perm[k] * d, X + from * d, d);
            if (t > bd) { bd = t; best = perm[k]; }
        }
        return best;
    }

    /* A row and its projection, as a float32 order key: the unsigned
       integer order of the keys is the order of the rounded projections
       (-0 sorts just below +0). */
    struct SqdKeyed {
        uint32_t key;
        Py_ssize_t idx;
    };
    static SQD_INLINE uint32_t sqd_order_key(double p) {
        const float f = p == p ? (float)p : 0.0f;   /* NaN (inf - inf) counts as 0 */
        uint32_t u;
        std::memcpy(&u, &f, sizeof(u));
        return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    }
    static SQD_INLINE double sqd_key_value(uint32_t key) {
        const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
        float f;
        std::memcpy(&f, &u, sizeof(f));
        return (double)f;
    }
    /* Stable sort of a[0..m) by key (tmp: m scratch items): insertion sort
       below 64 items, else least-significant-digit radix sort, three passes
       of 11 bits, a pass skipped when every key shares its digit.  O(m),
       against O(m log m) comparisons of (double, index) pairs with
       std::sort, which was 14-19% of a build. */
    static void sqd_sort_keyed(SqdKeyed* a, SqdKeyed* tmp, Py_ssize_t m) {
        if (m < 64) {
            for (Py_ssize_t i = 1; i < m; ++i) {
                const SqdKeyed x = a[i];
                Py_ssize_t j = i;
                for (; j > 0 && a[j - 1].key > x.key; --j) a[j] = a[j - 1];
                a[j] = x;
            }
            return;
        }
        enum { BITS = 11, BUCKETS = 1 << BITS };
        std::vector<Py_ssize_t> count(3 * BUCKETS, 0);
        for (Py_ssize_t i = 0; i < m; ++i) {
            const uint32_t k = a[i].key;
            ++count[k & (BUCKETS - 1)];
            ++count[BUCKETS + ((k >> BITS) & (BUCKETS - 1))];
            ++count[2 * BUCKETS + (k >> (2 * BITS))];
        }
        SqdKeyed* src = a;
        SqdKeyed* dst = tmp;
        for (int pass = 0; pass < 3; ++pass) {
            Py_ssize_t* c = count.data() + pass * BUCKETS;
            const int shift = pass * BITS;
            if (c[(src[0].key >> shift) & (BUCKETS - 1)] == m) continue;
            Py_ssize_t total = 0;
            for (int b = 0; b < BUCKETS; ++b) {
                const Py_ssize_t n = c[b];
                c[b] = total;
                total += n;
            }
            for (Py_ssize_t i = 0; i < m; ++i)
                dst[c[(src[i].key >> shift) & (BUCKETS - 1)]++] = src[i];
            std::swap(src, dst);
        }
        if (src != a) std::memcpy(a, src, (size_t)m * sizeof(SqdKeyed));
    }

    /* One pass over the m rows perm[0..m): each row with the sort key of
       its projection on u, (<x, u> - offset) * scale, into proj (if not
       NULL; see sqd_order_key), the rows' sum
       added to sum[0..d), and the largest squared distance to the float32
       centre pc (if not NULL) returned (else 0). */
    template <typename T, bool PROJ, bool SUM, bool DIST>
    static SQD_INLINE double sqd_node_pass_impl(const T* X, Py_ssize_t d, const Py_ssize_t* perm,
                                                Py_ssize_t m, const double* __restrict u,
                                                double offset, double scale, SqdKeyed* proj,
                                                double* __restrict sum,
                                                const float* __restrict pc) {
        /* Rows are taken two at a time, each with its own eight partial
           sums per quantity: every result is bit for bit what one row at a
           time gives (the same additions in the same order, sum[j] gets
           row k's term before row k + 1's), but the two rows' dependency
           chains interleave (one row at a time, the pass waited on the
           latency of its partial sums).  The rows are visited in perm
           order, scattered in memory: the rows AHEAD rows on are prefetched
           (without it, builds took 1.08-1.12x as long at d = 128; 8 or 16
           rows ahead measured the same as 4). */
        enum { AHEAD = 4 };
        const size_t row_bytes = (size_t)d * sizeof(T);
        double r2 = 0.0;
        Py_ssize_t k = 0;
        for (; k + 2 <= m; k += 2) {
            for (Py_ssize_t a = k + AHEAD; a < k + AHEAD + 2 && a < m; ++a) {
                const char* nxt = (const char*)(X + perm[a] * d);
                for (size_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(nxt + o);
            }
            const Py_ssize_t i0 = perm[k], i1 = perm[k + 1];
            const T* __restrict x0 = X + i0 * d;
            const T* __restrict x1 = X + i1 * d;
            /* partial sums q = 0..3 in the *l vectors, 4..7 in the *h ones */
            const sqd_v4d zero = {0, 0, 0, 0};
            sqd_v4d p0l = zero, p0h = zero, p1l = zero, p1h = zero;
            sqd_v4d e0l = zero, e0h = zero, e1l = zero, e1h = zero;
            Py_ssize_t j = 0;
            for (; j + 8 <= d; j += 8) {
                const sqd_v4d y0l = sqd_load4(x0 + j), y0h = sqd_load4(x0 + j + 4);
                const sqd_v4d y1l = sqd_load4(x1 + j), y1h = sqd_load4(x1 + j + 4);
                if (SUM) {
                    sqd_store4(sum + j, (sqd_load4(sum + j) + y0l) + y1l);
                    sqd_store4(sum + j + 4, (sqd_load4(sum + j + 4) + y0h) + y1h);
                }
                if (PROJ) {
                    const sqd_v4d ul = sqd_load4(u + j), uh = sqd_load4(u + j + 4);
                    p0l += y0l * ul;
                    p0h += y0h * uh;
                    p1l += y1l * ul;
                    p1h += y1h * uh;
                }
                if (DIST) {
                    const sqd_v4d cl = sqd_load4(pc + j), ch = sqd_load4(pc + j + 4);
                    const sqd_v4d t0l = y0l - cl, t0h = y0h - ch;
                    const sqd_v4d t1l = y1l - cl, t1h = y1h - ch;
                    e0l += t0l * t0l;
                    e0h += t0h * t0h;
                    e1l += t1l * t1l;
                    e1h += t1h * t1h;
                }
            }
            double p0[8], p1[8], e0[8], e1[8];
            sqd_store4(p0, p0l); sqd_store4(p0 + 4, p0h);
            sqd_store4(p1, p1l); sqd_store4(p1 + 4, p1h);
            sqd_store4(e0, e0l); sqd_store4(e0 + 4, e0h);
            sqd_store4(e1, e1l); sqd_store4(e1 + 4, e1h);
            for (; j < d; ++j) {
                const double y0 = (double)x0[j], y1 = (double)x1[j];
                if (SUM) sum[j] = (sum[j] + y0) + y1;
                if (PROJ) {
                    p0[0] += y0 * u[j];
                    p1[0] += y1 * u[j];
                }
                if (DIST) {
                    const double t0 = y0 - (double)pc[j], t1 = y1 - (double)pc[j];
                    e0[0] += t0 * t0;
                    e1[0] += t1 * t1;
                }
            }
            if (PROJ) {
                const double a0 = sqd_fold8(p0), a1 = sqd_fold8(p1);
                proj[k] = SqdKeyed{sqd_order_key((a0 - offset) * scale), i0};
                proj[k + 1] = SqdKeyed{sqd_order_key((a1 - offset) * scale), i1};
            }
            if (DIST) {
                const double t0 = sqd_fold8(e0), t1 = sqd_fold8(e1);
                if (t0 > r2) r2 = t0;
                if (t1 > r2) r2 = t1;
            }
        }
        if (k < m) {   /* the last row of an odd count */
            const Py_ssize_t i = perm[k];
            const T* __restrict x = X + i * d;
            if (SUM)
                for (Py_ssize_t j = 0; j < d; ++j) sum[j] += (double)x[j];
            if (PROJ) {
                const double p = sqd_dot_impl<T>(x, u, d);
                proj[k] = SqdKeyed{sqd_order_key((p - offset) * scale), i};
            }
            if (DIST) {
                const double t = sqd_dist2_impl<T, float>(x, pc, d);
                if (t > r2) r2 = t;
            }
        }
        return r2;
    }

    /* One Lloyd assignment pass over the rows perm[start], perm[start +
       step], ... (< end): a row goes to the second mean iff <x, u> > h; its
       coordinates are added to s2 (else s1) and the counts bumped. */
    template <typename T>
    static SQD_INLINE void sqd_lloyd_pass_impl(const T* X, Py_ssize_t d, const Py_ssize_t* perm,
                                               Py_ssize_t start, Py_ssize_t end,
                                               Py_ssize_t step, const double* __restrict u,
                                               double h, double* __restrict s1,
                                               double* __restrict s2, Py_ssize_t* n1,
                                               Py_ssize_t* n2) {
        for (Py_ssize_t k = start; k < end; k += step) {
            const T* __restrict x = X + perm[k] * d;
            const bool second = sqd_dot_impl<T>(x, u, d) > h;
            double* __restrict s = second ? s2 : s1;
            ++*(second ? n2 : n1);
            for (Py_ssize_t j = 0; j < d; ++j) s[j] += (double)x[j];
        }
    }

#define SQD_BUILDER_KERNELS(T)                                                               \
    SQD_CLONES static double sqd_row_dist2(const T* x, const T* y, Py_ssize_t d) {          \
        return sqd_dist2_impl<T, T>(x, y, d);                                               \
    }                                                                                       \
    SQD_CLONES static Py_ssize_t sqd_farthest(const T* X, Py_ssize_t d,                     \
                                              const Py_ssize_t* perm, Py_ssize_t from,      \
                                              Py_ssize_t start, Py_ssize_t end,             \
                                              Py_ssize_t step) {                            \
        return sqd_farthest_impl<T>(X, d, perm, from, start, end, step);                    \
    }                                                                                       \
    SQD_CLONES static double sqd_node_pass(const T* X, Py_ssize_t d, const Py_ssize_t* perm, \
                                           Py_ssize_t m, const double* u, double offset,    \
                                           double scale,                                    \
                                           SqdKeyed* proj,                                  \
                                           double* sum, const float* pc) {                  \
        if (proj && pc)                                                                     \
            return sqd_node_pass_impl<T, true, true, true>(X, d, perm, m, u, offset, scale, \
                                                           proj, sum, pc);                  \
        if (proj)                                                                           \
            return sqd_node_pass_impl<T, true, true, false>(X, d, perm, m, u, offset, scale,\
                                                            proj, sum, pc);                 \
        if (pc && !sum)                                                                     \
            return sqd_node_pass_impl<T, false, false, true>(X, d, perm, m, u, offset,      \
                                                             scale, proj, sum, pc);         \
        if (pc)                                                                             \
            return sqd_node_pass_impl<T, false, true, true>(X, d, perm, m, u, offset, scale,\
                                                            proj, sum, pc);                 \
        return sqd_node_pass_impl<T, false, true, false>(X, d, perm, m, u, offset, scale,   \
                                                         proj, sum, pc);                    \
    }                                                                                       \
    SQD_CLONES static void sqd_lloyd_pass(const T* X, Py_ssize_t d, const Py_ssize_t* perm, \
                                          Py_ssize_t start, Py_ssize_t end, Py_ssize_t step,\
                                          const double* u, double h, double* s1,            \
                                          double* s2, Py_ssize_t* n1, Py_ssize_t* n2) {     \
        sqd_lloyd_pass_impl<T>(X, d, perm, start, end, step, u, h, s1, s2, n1, n2);         \
    }                                                                                       \
    /* squared distances of rows [start, end) to the float32 centre c */                    \
    SQD_CLONES static double sqd_range_dist2(const T* X, Py_ssize_t d, Py_ssize_t start,    \
                                             Py_ssize_t end, const float* c,                \
                                             double* dist) {                                \
        double r2 = 0.0;                                                                    \
        for (Py_ssize_t s = start; s < end; ++s) {                                          \
            double t = sqd_dist2_impl<T, float>(X + s * d, c, d);                           \
            if (dist) dist[s - start] = t;                                                  \
            if (t > r2) r2 = t;                                                             \
        }                                                                                   \
        return r2;                                                                          \
    }                                                                                       \
    /* the largest |x_j - c_j| over the live rows of [start, end) (ids >= 0), and    \
       their number and sum of ec into *n_live and *sum_ec */                                \
    SQD_CLONES static double sqd_range_maxdiff(const T* X, Py_ssize_t d, const Py_ssize_t* ids,\
                                               const float* ec, Py_ssize_t start,           \
                                               Py_ssize_t end, const float* c,              \
                                               Py_ssize_t* n_live, double* sum_ec) {        \
        double m[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                             \
        Py_ssize_t n = 0;                                                                   \
        double se = 0.0;                                                                    \
        for (Py_ssize_t s = start; s < end; ++s) {                                          \
            if (ids[s] < 0) continue;                                                       \
            ++n;                                                                            \
            se += ec[s];                                                                    \
            const T* __restrict x = X + s * d;                                              \
            Py_ssize_t j = 0;                                                               \
            for (; j + 8 <= d; j += 8)                                                      \
                for (int q = 0; q < 8; ++q) {                                               \
                    const double t = std::fabs((double)x[j + q] - (double)c[j + q]);        \
                    m[q] = t > m[q] ? t : m[q];                                             \
                }                                                                           \
            for (; j < d; ++j) {                                                            \
                const double t = std::fabs((double)x[j] - (double)c[j]);                    \
                m[0] = t > m[0] ? t : m[0];                                                 \
            }                                                                               \
        }                                                                                   \
        *n_live = n;                                                                        \
        *sum_ec = se;                                                                       \
        double r = 0.0;                                                                     \
        for (int q = 0; q < 8; ++q) r = m[q] > r ? m[q] : r;                                \
        return r;                                                                           \
    }                                                                                       \
    /* sum[0..d) = sum of rows [start, end) */                                              \
    SQD_CLONES static void sqd_range_sum(const T* X, Py_ssize_t d, Py_ssize_t start,        \
                                         Py_ssize_t end, double* __restrict sum) {          \
        for (Py_ssize_t j = 0; j < d; ++j) sum[j] = 0.0;                                    \
        for (Py_ssize_t s = start; s < end; ++s) {                                          \
            const T* __restrict x = X + s * d;                                              \
            for (Py_ssize_t j = 0; j < d; ++j) sum[j] += (double)x[j];                      \
        }                                                                                   \
    }
    SQD_BUILDER_KERNELS(float)
    SQD_BUILDER_KERNELS(double)
#undef SQD_BUILDER_KERNELS

    /* Tree builder.  Node ranges are positions in perm; nodes are stored in
       DFS preorder, so the left child of node i is i + 1 and the right child
       is rights[i] (-1 for a leaf).  A node of more than leaf_size points is
       split by a hyperplane found by 2-means: two far-apart points, refined
       (on nodes of more than LLOYD_MIN points) by Lloyd iterations in full
       dimension on a strided sample of at most SAMPLE points, give two
       means; the points are sorted by their projection on the difference
       of the means and cut where the within-side sum of squares of the
       projections is least (1-D 2-means over every cut).  Such a cut follows the gaps between clusters at any
       ratio: a small cluster (or a piece of one, cut at a higher level) is
       split off on its own instead of sharing a node, and so a ball, with
       part of a big one.  Lopsided cuts (refined builds only) are allowed
       while the depth budget holds: with steps(m) the number of levels needed below a node of m
       points if every cut is restricted to the middle half of the range
       (children of at most m - m/4 points), a cut is taken only if
       depth + 1 + steps(bigger child) <= budget, budget =
       min(2 steps(n) + 4, 120); otherwise the best cut inside the middle
       half is taken.  Hence depth + steps(m) never exceeds
       max(budget, steps(n)), the depth is O(log n) (and below MAX_DEPTH =
       128 for any realistic n), and the build is O(n d log n).  The split
       depends only on the node's points (in their order) and its depth, so
       subtrees can be built in any order, on any thread. */
    template <typename T>
    struct SqdBuilder {
        /* Lloyd runs on nodes of more than LLOYD_MIN points (those that
           hold many clusters), on a sample of at most SAMPLE of them: at
           most 3 projection passes' worth of work per node.  Below, the
           far-pair direction cut as well in measurements, for less.  With
           refined = false (small segments that single adds rebuild again
           and again, see _build_segment) it is skipped altogether, and so
           are lopsided cuts. */
        enum { SAMPLE = 256, LLOYD_ITERS = 6, LLOYD_MIN = 1024, FAR = 512, FAR_TAIL = 64 };
        bool refined;
        const T* X;
        Py_ssize_t d, leaf_size;
        Py_ssize_t* perm;
        std::vector<Py_ssize_t>* starts;
        std::vector<Py_ssize_t>* ends;
        std::vector<Py_ssize_t>* rights;
        /* Per node, in preorder: the centre (d floats; the centroid, for
           internal nodes) and the largest squared distance of its points to
           it (internal nodes only: a leaf's are computed with its refined
           centre afterwards, see _node_stats).  A node's centroid is summed
           in the same pass as its projections; its points' distances to it
           are measured in its children's passes (or, for a leaf child, one
           pass of its own), so no extra pass over the points is made. */
        std::vector<float>* centers;
        std::vector<double>* r2s;
        /* The parent of this builder's root, for subtrees built apart (see
           cutoff): its centre, and the largest squared distance of the
           subtree's points to it. */
        const float* ext_center = nullptr;
        double ext_r2 = 0.0;
        Py_ssize_t budget;
        /* Subtrees of at most `cutoff` points (> leaf_size) are not built
           but recorded in `pending` (their node gets right = -2 - index,
           and their depth is kept), so that they can be built in parallel
           and spliced in afterwards. */
        Py_ssize_t cutoff = 0;
        /* Threads for the pass of nodes of at least PAR_MIN
           points (the top levels, above the subtrees built in parallel):
           otherwise one thread walks every point at each of those levels
           while the others wait. */
        int par_threads = 1;
        enum { PAR_MIN = 4096 };
        std::vector<std::pair<Py_ssize_t, Py_ssize_t> > pending;
        std::vector<Py_ssize_t> pending_depth, pending_parent;
        std::vector<SqdKeyed> proj, proj_tmp;
        /* The projection of the node's first row on u (0 if not finite): the
           sort keys are the projections minus it, rounded to float32, so
           that their precision is relative to the node's extent along u,
           not to its distance from the origin. */
        double u_offset = 0.0;
        /* A power of two (exact) near 1 / (max |u_j| max |p1_j - p2_j|),
           which brings the keys of points within the far pair's extent to
           at most about d: float32 keys then neither overflow nor underflow
           for data at any scale. */
        double u_scale = 1.0;
        std::vector<double> pre, pre2, u, c1, c2, s1, s2, sum;

        SqdBuilder(const T* X_, Py_ssize_t d_, Py_ssize_t leaf_size_, Py_ssize_t* perm_,
                   Py_ssize_t n, std::vector<Py_ssize_t>* starts_,
                   std::vector<Py_ssize_t>* ends_, std::vector<Py_ssize_t>* rights_,
                   std::vector<float>* centers_, std::vector<double>* r2s_, bool refined_)
            : X(X_), d(d_), leaf_size(leaf_size_), perm(perm_), starts(starts_), ends(ends_),
              rights(rights_), centers(centers_), r2s(r2s_), refined(refined_), u(d_), c1(d_),
              c2(d_), s1(d_), s2(d_), sum(d_) {
            Py_ssize_t b = 2 * steps(n) + 4;
            budget = b < 120 ? b : 120;
        }

        /* Levels below a node of m points when every cut is in the middle half. */
        Py_ssize_t steps(Py_ssize_t m) const {
            Py_ssize_t k = 0;
            while (m > leaf_size && m >= 2) {
                Py_ssize_t big = m - m / 4;
                m = big < m - 1 ? big : m - 1;
                ++k;
            }
            return k;
        }
        double dist2(Py_ssize_t a, Py_ssize_t b) const {
            return sqd_row_dist2(X + a * d, X + b * d, d);
        }
        Py_ssize_t farthest(Py_ssize_t from, Py_ssize_t start, Py_ssize_t end,
                            Py_ssize_t step) const {
            return sqd_farthest(X, d, perm, from, start, end, step);
        }
        /* Split direction into u: the difference of the two means of a few
           Lloyd iterations on a strided sample, seeded by a far-apart pair.
           The pair comes from a strided sample of at most 512 points (64
           in the tail segments that single adds rebuild: there the two
           passes over 512 points were 14% of an add's instructions
           at d = 128, and the smaller sample screens 0.5-1.2% more points
           of a grown index), or from all of them if the sample shows no
           spread (a few distinct points among many duplicates).  Returns
           false if all points are equal. */
        bool direction(Py_ssize_t start, Py_ssize_t end) {
            const Py_ssize_t far = refined ? FAR : FAR_TAIL;
            Py_ssize_t step = (end - start + far - 1) / far;
            Py_ssize_t p1 = farthest(perm[start], start, end, step);
            Py_ssize_t p2 = farthest(p1, start, end, step);
            if (!(dist2(p1, p2) > 0) && step > 1) {
                p1 = farthest(perm[start], start, end, 1);
                p2 = farthest(p1, start, end, 1);
            }
            if (!(dist2(p1, p2) > 0)) return false;
            for (Py_ssize_t j = 0; j < d; ++j) {
                c1[j] = (double)X[p1 * d + j];
                c2[j] = (double)X[p2 * d + j];
            }
            step = (end - start + SAMPLE - 1) / SAMPLE;
            const int iters = refined && end - start > LLOYD_MIN ? LLOYD_ITERS : 0;
            for (int it = 0; it < iters; ++it) {
                /* x is nearer to c2 iff <x, c2 - c1> > (|c2|^2 - |c1|^2) / 2 */
                double h = 0;
                for (Py_ssize_t j = 0; j < d; ++j) {
                    u[j] = c2[j] - c1[j];
                    h += 0.5 * u[j] * (c2[j] + c1[j]);
                }
                std::fill(s1.begin(), s1.end(), 0.0);
                std::fill(s2.begin(), s2.end(), 0.0);
                Py_ssize_t n1 = 0, n2 = 0;
                sqd_lloyd_pass(X, d, perm, start, end, step, u.data(), h, s1.data(), s2.data(),
                               &n1, &n2);
                if (n1 == 0 || n2 == 0) break;
                bool same = true;
                for (Py_ssize_t j = 0; j < d; ++j) {
                    double a = s1[j] / n1, b = s2[j] / n2;
                    same = same && a == c1[j] && b == c2[j];
                    c1[j] = a;
                    c2[j] = b;
                }
                if (same) break;
            }
            double un = 0;
            for (Py_ssize_t j = 0; j < d; ++j) {
                u[j] = c2[j] - c1[j];
                un += u[j] * u[j];
            }
            if (!(un > 0))   /* the means coincide: fall back to the far pair */
                for (Py_ssize_t j = 0; j < d; ++j)
                    u[j] = (double)X[p2 * d + j] - (double)X[p1 * d + j];
            u_offset = sqd_xdot(X + perm[start] * d, u.data(), d);
            if (!std::isfinite(u_offset)) u_offset = 0.0;
            double umax = 0, xmax = 0;   /* largest |u_j| and |p1_j - p2_j| */
            for (Py_ssize_t j = 0; j < d; ++j) {
                umax = std::max(umax, std::fabs(u[j]));
                xmax = std::max(xmax, std::fabs((double)X[p2 * d + j] - (double)X[p1 * d + j]));
            }
            u_scale = 1.0;
            if (umax > 0 && xmax > 0 && std::isfinite(umax) && std::isfinite(xmax)) {
                const int e = std::ilogb(umax) + std::ilogb(xmax);
                u_scale = std::ldexp(1.0, e > 1000 ? -1000 : e < -1000 ? 1000 : -e);
            }
            return true;
        }
        /* Cut in [lo, hi] minimising the within-side sum of squares of the
           sorted projections (pre, pre2 are their prefix sums). */
        Py_ssize_t best_cut(Py_ssize_t m, Py_ssize_t lo, Py_ssize_t hi) const {
            Py_ssize_t cut = lo;
            double best = HUGE_VAL;   /* rounding can make an sse slightly negative */
            for (Py_ssize_t c = lo; c <= hi; ++c) {
                double sl = pre[c], sr = pre[m] - pre[c];
                double sse = (pre2[c] - sl * sl / c) + (pre2[m] - pre2[c] - sr * sr / (m - c));
                if (sse < best) { best = sse; cut = c; }
            }
            return cut;
        }

        /* sqd_node_pass over par_threads contiguous pieces of the node's
           rows; the pieces' sums are added in piece order (so the centroid
           depends on the thread count only in its rounding; the split does
           not depend on it at all). */
        double parallel_pass(Py_ssize_t start, Py_ssize_t m, bool split, const float* pc) {
            const int nt = par_threads;
            std::vector<double> sums((size_t)nt * d, 0.0), r2(nt, 0.0);
            #pragma omp parallel for schedule(static, 1) num_threads(nt)
            for (int t = 0; t < nt; ++t) {
                const Py_ssize_t k0 = m * t / nt, k1 = m * (t + 1) / nt;
                r2[t] = sqd_node_pass(X, d, perm + start + k0, k1 - k0,
                                      split ? u.data() : nullptr, u_offset, u_scale,
                                      split ? proj.data() + k0 : nullptr,
                                      sums.data() + (size_t)t * d, pc);
            }
            double best = 0.0;
            for (int t = 0; t < nt; ++t) {
                for (Py_ssize_t j = 0; j < d; ++j) sum[j] += sums[(size_t)t * d + j];
                if (r2[t] > best) best = r2[t];
            }
            return best;
        }
        /* The largest squared distance t of the parent's points found by a
           pass of one of its children. */
        void to_parent(Py_ssize_t parent, double t) {
            double& r2 = parent >= 0 ? (*r2s)[parent] : ext_r2;
            if (t > r2) r2 = t;
        }
        const float* center_of(Py_ssize_t node) const {
            return node >= 0 ? centers->data() + node * d : ext_center;
        }

        void build(Py_ssize_t start, Py_ssize_t end, Py_ssize_t depth, Py_ssize_t parent) {
            Py_ssize_t me = (Py_ssize_t)starts->size();
            starts->push_back(start);
            ends->push_back(end);
            rights->push_back(-1);
            centers->resize((size_t)(me + 1) * d, 0.0f);
            r2s->push_back(0.0);
            Py_ssize_t m = end - start;
            if (m <= cutoff && m > leaf_size && m >= 2) {
                (*rights)[me] = -2 - (Py_ssize_t)pending.size();
                pending.push_back(std::make_pair(start, end));
                pending_depth.push_back(depth);
                pending_parent.push_back(parent);
                return;
            }
            const float* pc = center_of(parent);
            if (m <= leaf_size || m < 2) {
                if (pc) to_parent(parent, sqd_node_pass(X, d, perm + start, m, nullptr, 0.0,
                                                        1.0, nullptr, nullptr, pc));
                return;
            }
            Py_ssize_t lo = m / 4, hi = m - m / 4;   /* middle half, as offsets */
            if (lo < 1) lo = 1;
            if (hi > m - 1) hi = m - 1;
            /* A lopsided cut leaves at least 2 points (at most lo) on each
               side: in high dimension the far pair's own two points project
               far outside the rest, and nodes of up to about d points
               peeled them off one by one (Gaussian n = 20,000, d = 130,
               leaf_size = 64: 969 of 1372 leaves held a single point, and
               queries took 1.5x as long).  Larger floors cost clustered
               data: leaf_size / 16 screened 5-14% more points of the
               clustered benchmark at 0.1% selectivity, and 4 would merge a
               cluster of 3 points into a bigger ball; 2 screens 0.2-0.5%
               more. */
            const Py_ssize_t min_side = lo < 2 ? lo : 2;
            Py_ssize_t cut = m / 2;
            const bool split = direction(start, end);
            /* One pass: the projections' sort keys (NaN, from inf - inf
               near the overflow limit, becomes 0), this node's centroid,
               and the distances to the parent's centre. */
            proj.resize(m);
            std::fill(sum.begin(), sum.end(), 0.0);
            const bool par = par_threads > 1 && m >= PAR_MIN;
            const double t = par ? parallel_pass(start, m, split, pc)
                                 : sqd_node_pass(X, d, perm + start, m,
                                                 split ? u.data() : nullptr, u_offset, u_scale,
                                                 split ? proj.data() : nullptr, sum.data(), pc);
            if (pc) to_parent(parent, t);
            float* c = centers->data() + me * d;
            for (Py_ssize_t j = 0; j < d; ++j) c[j] = (float)(sum[j] / m);
            if (split) {
                proj_tmp.resize(m);
                sqd_sort_keyed(proj.data(), proj_tmp.data(), m);
                for (Py_ssize_t k = 0; k < m; ++k) perm[start + k] = proj[k].idx;
                pre.assign(m + 1, 0.0);
                pre2.assign(m + 1, 0.0);
                double shift = sqd_key_value(proj[m / 2].key);   /* centre for stable sums */
                for (Py_ssize_t k = 0; k < m; ++k) {
                    double v = sqd_key_value(proj[k].key) - shift;
                    pre[k + 1] = pre[k] + v;
                    pre2[k + 1] = pre2[k] + v * v;
                }
                /* Lopsided cuts only in refined builds: on clustered points they
                   peel clusters off one by one, which makes the tree up to
                   twice as deep and its build ~3x slower, and the small
                   segments that single adds rebuild cannot afford that. */
                cut = best_cut(m, refined ? min_side : lo, refined ? m - min_side : hi);
                Py_ssize_t big = cut > m - cut ? cut : m - cut;
                if (depth + 1 + steps(big) > budget) cut = best_cut(m, lo, hi);
            }
            build(start, start + cut, depth + 1, me);
            (*rights)[me] = (Py_ssize_t)starts->size();
            build(start + cut, end, depth + 1, me);
        }
    };
    /* A smaller ball for a leaf: Badoiu-Clarkson steps from the centroid c
       towards the farthest of the leaf's K points farthest from c (dist2:
       their squared distances to c, in range order; order: m scratch
       slots).  Any centre is valid (the radius is measured from the stored
       one); in measurements on Gaussian clusters this shrinks the leaf radii
       enough to screen ~10% fewer points. */
    template <typename T>
    static void sqd_refine_center(const T* X, Py_ssize_t d, Py_ssize_t start, Py_ssize_t m,
                                  const double* dist2, Py_ssize_t* order, double* c) {
        enum { K = 32, ITERS = 20, OFFSET = 8 };
        for (Py_ssize_t k = 0; k < m; ++k) order[k] = k;
        const Py_ssize_t n_cand = m < K ? m : K;
        if (n_cand == 0) return;
        std::nth_element(order, order + (m - n_cand), order + m,
                         [dist2](Py_ssize_t a, Py_ssize_t b) {
                             return dist2[a] < dist2[b] || (dist2[a] == dist2[b] && a < b);
                         });
        const Py_ssize_t* cand = order + (m - n_cand);
        for (int it = 0; it < ITERS; ++it) {
            Py_ssize_t far = cand[0];
            double best = -1.0;
            for (Py_ssize_t k = 0; k < n_cand; ++k) {
                const T* x = X + (start + cand[k]) * d;
                double s[4] = {0, 0, 0, 0};   /* 4 chains: no FP reassociation needed */
                Py_ssize_t j = 0;
                for (; j + 4 <= d; j += 4)
                    for (int r = 0; r < 4; ++r) {
                        double t = (double)x[j + r] - c[j + r];
                        s[r] += t * t;
                    }
                for (; j < d; ++j) {
                    double t = (double)x[j] - c[j];
                    s[0] += t * t;
                }
                const double dist = (s[0] + s[1]) + (s[2] + s[3]);
                if (dist > best) { best = dist; far = cand[k]; }
            }
            const T* x = X + (start + far) * d;
            const double step = 1.0 / (it + OFFSET);
            for (Py_ssize_t j = 0; j < d; ++j) c[j] += step * ((double)x[j] - c[j]);
        }
    }

    /* A tree's nodes in preorder (see SqdBuilder); ext_r2: for a subtree
       built apart, the largest squared distance of its points to the
       centre of its root's parent. */
    struct SqdNodes {
        std::vector<Py_ssize_t> starts, ends, rights;
        std::vector<float> centers;
        std::vector<double> r2s;
        double ext_r2 = 0.0;
    };

    /* Append node i of the top tree (and its subtree) to out in preorder,
       replacing each pending node by its separately built subtree. */
    static void sqd_splice(const SqdNodes& top, Py_ssize_t i, const std::vector<SqdNodes>& subs,
                           Py_ssize_t d, SqdNodes& out) {
        Py_ssize_t r = top.rights[i];
        if (r <= -2) {
            const SqdNodes& sub = subs[-2 - r];
            Py_ssize_t base = (Py_ssize_t)out.starts.size();
            for (size_t j = 0; j < sub.starts.size(); ++j) {
                out.starts.push_back(sub.starts[j]);
                out.ends.push_back(sub.ends[j]);
                out.rights.push_back(sub.rights[j] >= 0 ? sub.rights[j] + base : -1);
                out.r2s.push_back(sub.r2s[j]);
            }
            out.centers.insert(out.centers.end(), sub.centers.begin(), sub.centers.end());
            return;
        }
        Py_ssize_t me = (Py_ssize_t)out.starts.size();
        out.starts.push_back(top.starts[i]);
        out.ends.push_back(top.ends[i]);
        out.rights.push_back(-1);
        out.r2s.push_back(top.r2s[i]);
        out.centers.insert(out.centers.end(), top.centers.begin() + i * d,
                           top.centers.begin() + (i + 1) * d);
        if (r == -1) return;
        sqd_splice(top, i + 1, subs, d, out);
        out.rights[me] = (Py_ssize_t)out.starts.size();
        sqd_splice(top, r, subs, d, out);
    }

    /* Rows start + i of n_arrays arrays (row i of array a at base[a] +
       i * row_bytes[a]) get the rows start + perm[i] (perm: a permutation
       of 0..n-1), in place: each cycle of perm is followed with one row of
       scratch per array, so every row is read and written once. */
    static void sqd_permute_rows(char* const* base, const size_t* row_bytes, int n_arrays,
                                 Py_ssize_t start, const Py_ssize_t* perm, Py_ssize_t n) {
        size_t total = 0;
        for (int a = 0; a < n_arrays; ++a) total += row_bytes[a];
        std::vector<char> scratch(total);
        std::vector<unsigned char> done(n, 0);
        for (Py_ssize_t i = 0; i < n; ++i) {
            if (done[i]) continue;
            done[i] = 1;
            if (perm[i] == i) continue;
            char* tmp = scratch.data();
            for (int a = 0; a < n_arrays; ++a) {
                std::memcpy(tmp, base[a] + (start + i) * row_bytes[a], row_bytes[a]);
                tmp += row_bytes[a];
            }
            Py_ssize_t j = i;
            for (Py_ssize_t src = perm[j]; src != i; j = src, src = perm[j]) {
                __builtin_prefetch(base[0] + (start + perm[src]) * row_bytes[0]);
                for (int a = 0; a < n_arrays; ++a)
                    std::memcpy(base[a] + (start + j) * row_bytes[a],
                                base[a] + (start + src) * row_bytes[a], row_bytes[a]);
                done[src] = 1;
            }
            tmp = scratch.data();
            for (int a = 0; a < n_arrays; ++a) {
                std::memcpy(base[a] + (start + j) * row_bytes[a], tmp, row_bytes[a]);
                tmp += row_bytes[a];
            }
        }
    }

    /* Build the tree of n points into out; large inputs build the top
       levels first, then the subtrees below them in parallel (OpenMP), then
       splice. */
    template <typename T>
    static void sqd_build_tree_impl(const T* X, Py_ssize_t d, Py_ssize_t* perm, Py_ssize_t n,
                                    Py_ssize_t leaf_size, SqdNodes& out, int n_threads,
                                    bool refined) {
        if (n_threads <= 1 || n < 16384) {
            SqdBuilder<T> b(X, d, leaf_size, perm, n, &out.starts, &out.ends, &out.rights,
                            &out.centers, &out.r2s, refined);
            b.build(0, n, 0, -1);
            return;
        }
        SqdNodes top;
        SqdBuilder<T> b(X, d, leaf_size, perm, n, &top.starts, &top.ends, &top.rights,
                        &top.centers, &top.r2s, refined);
        Py_ssize_t cutoff = n / (4 * (Py_ssize_t)n_threads);
        b.cutoff = cutoff > leaf_size ? cutoff : leaf_size + 1;
        b.par_threads = n_threads;
        b.build(0, n, 0, -1);
        std::vector<SqdNodes> subs(b.pending.size());
        int failed = 0;
        #pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
        for (Py_ssize_t k = 0; k < (Py_ssize_t)b.pending.size(); ++k) {
            try {
                /* n, not the subtree's size: the same depth budget */
                SqdBuilder<T> sb(X, d, leaf_size, perm, n, &subs[k].starts, &subs[k].ends,
                                 &subs[k].rights, &subs[k].centers, &subs[k].r2s, refined);
                /* a pending node is never the root: its parent is a top node */
                sb.ext_center = top.centers.data() + b.pending_parent[k] * d;
                sb.build(b.pending[k].first, b.pending[k].second, b.pending_depth[k], -1);
                subs[k].ext_r2 = sb.ext_r2;
            } catch (...) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        if (failed) throw std::bad_alloc();
        for (size_t k = 0; k < subs.size(); ++k) {
            double& r2 = top.r2s[b.pending_parent[k]];
            if (subs[k].ext_r2 > r2) r2 = subs[k].ext_r2;
        }
        sqd_splice(top, 0, subs, d, out);
    }
    static void sqd_build_tree(const float* X, Py_ssize_t d, Py_ssize_t* perm, Py_ssize_t n,
                               Py_ssize_t leaf_size, SqdNodes& out, int n_threads,
                               bool refined) {
        sqd_build_tree_impl<float>(X, d, perm, n, leaf_size, out, n_threads, refined);
    }
    static void sqd_build_tree(const double* X, Py_ssize_t d, Py_ssize_t* perm, Py_ssize_t n,
                               Py_ssize_t leaf_size, SqdNodes& out, int n_threads,
                               bool refined) {
        sqd_build_tree_impl<double>(X, d, perm, n, leaf_size, out, n_threads, refined);
    }

    /* Per-thread result buffers that keep their capacity between calls (a
       query reporting 20k ids would otherwise regrow an empty vector,
       copying and zero-filling about twice its output): ids and scores of
       the single queries a thread runs, and part_ids and part_scores, the
       hits of the subtrees it walks for a split query (see _query_split;
       only used inside that parallel region). */
    struct SqdThreadBuffers {
        std::vector<Py_ssize_t> ids, part_ids;
        std::vector<double> scores, part_scores;
    };
    static SqdThreadBuffers& sqd_thread_buffers() {
        static thread_local SqdThreadBuffers b;
        return b;
    }
    static inline Py_ssize_t sqd_next_task(Py_ssize_t* counter) {
        return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    }

    """
    cppclass SqdThreadBuffers:
        vector[intp_t] ids
        vector[intp_t] part_ids
        vector[double] scores
        vector[double] part_scores
    SqdThreadBuffers& sqd_thread_buffers() noexcept nogil
    intp_t sqd_next_task(intp_t* counter) noexcept nogil
    int sqd_isa() noexcept nogil
    void sqd_advise_hugepages(void* p, size_t n) noexcept nogil
    void sqd_prefetch_rows(const char* rows, intp_t row_bytes, intp_t s0,
                           const int32_t* pos, intp_t n) noexcept nogil
    void sqd_prefetch_row(const char* row, intp_t row_bytes) noexcept nogil
    void sqd_prefetch_span(const char* p, intp_t n) noexcept nogil
    void sqd_prefetch_span_l2(const char* p, intp_t n) noexcept nogil
    void sqd_split_flags(const unsigned char* flag, intp_t n, int32_t* acc,
                         intp_t* n_acc, int32_t* ver, intp_t* n_ver) noexcept nogil
    int sqd_isa_detected() noexcept nogil
    int sqd_isa_cap
    int sqd_qmax() noexcept nogil
    intp_t sqd_range_dots(const uint8_t* codes, intp_t dpad, intp_t s0, intp_t s1,
                          const int8_t* qw, const int8_t* qw2, int32_t* out,
                          int32_t* out2) noexcept nogil
    intp_t sqd_nib_range_dots(const uint8_t* plane, intp_t dpad8, intp_t s0, intp_t s1,
                              const int8_t* qw, int32_t* out) noexcept nogil
    void sqd_nib_dots(const uint8_t* plane, intp_t nblk, intp_t dpad8, const int8_t* qw,
                      int32_t* out) noexcept nogil
    void sqd_nib_dots8(const uint8_t* hi, const uint8_t* lo, intp_t nblk, intp_t dpad8,
                       const int8_t* qw, const int8_t* qw2, int32_t* out) noexcept nogil
    void sqd_screen_int(const int32_t* dots, intp_t n, int32_t hi, int32_t lo, int32_t* acc,
                        intp_t* n_acc, int32_t* ver, intp_t* n_ver) noexcept nogil
    void sqd_stage1_whole(const uint8_t* hi, const uint8_t* lo, intp_t dpad8, intp_t s0, intp_t n,
                          const int8_t* qw, const int8_t* qw2, int32_t* dots, int32_t sub,
                          int32_t sub2, int64_t K, int64_t thi, int64_t tlo, intp_t base,
                          int32_t* acc, intp_t* n_acc, intp_t* ver, double* ver_f,
                          intp_t* n_ver) noexcept nogil
    void sqd_stage1(const intp_t* slot, intp_t n, const int32_t* o, intp_t b0, int32_t sub,
                    int32_t sub2, int64_t K, int64_t hi, int64_t lo, intp_t base,
                    int32_t* acc, intp_t* n_acc, intp_t* ver, double* ver_f,
                    intp_t* n_ver) noexcept nogil
    void sqd_row3_dots(const uint8_t* row, intp_t dpad8, const int8_t* qw, const int8_t* qw2,
                       int32_t* o1, int32_t* o2) noexcept nogil
    void sqd_row_dots(const uint8_t* row, intp_t dpad, const int8_t* qw, const int8_t* qw2,
                      int32_t sumq128, int32_t sumq2_128, int32_t* e1,
                      int32_t* e2) noexcept nogil
    void sqd_classify_f32(const int32_t* dots, const int32_t* dots2, int32_t sub1,
                          int32_t sub2, intp_t n,
                          const float* scale, const float* ea, const float* ec, float t,
                          float t2, float A, float C, float b_up, float b_dn, float rel,
                          float tiny, unsigned char* flag) noexcept nogil
    void sqd_screen_f32(const int32_t* dots, const int32_t* dots2, int32_t sub1,
                        int32_t sub2, intp_t n,
                        const float* scale, const float* ea, const float* ec, float t,
                        float t2, float A, float C, float b_up, float b_dn, float rel,
                        float tiny, unsigned char* flag, int32_t* acc, intp_t* n_acc,
                        int32_t* ver, intp_t* n_ver) noexcept nogil
    void sqd_classify(const int32_t* dots, const int32_t* dots2, int32_t sub1,
                      int32_t sub2, intp_t n,
                      const float* scale, const float* ea, const float* ec, double t,
                      double t2, double A, double C, double b, double rel, double tiny,
                      unsigned char* flag) noexcept nogil
    double sqd_xdot(const float* a, const double* b, intp_t d) noexcept nogil
    double sqd_xdot(const double* a, const double* b, intp_t d) noexcept nogil
    void sqd_encode_level1(const float* p, intp_t d, double s, uint8_t* q_out, double* qn2,
                           double* en2, double* maxe) noexcept nogil
    void sqd_encode_level1(const double* p, intp_t d, double s, uint8_t* q_out, double* qn2,
                           double* en2, double* maxe) noexcept nogil
    double sqd_encode_level2(const float* p, intp_t d, double s1, double s2,
                             uint8_t* q) noexcept nogil
    double sqd_encode_level2(const double* p, intp_t d, double s1, double s2,
                             uint8_t* q) noexcept nogil
    int omp_get_max_threads() noexcept nogil
    void sqd_refine_center[T](const T* X, intp_t d, intp_t start, intp_t m,
                              const double* dist2, intp_t* order, double* c) noexcept nogil
    cppclass SqdNodes:
        vector[intp_t] starts, ends, rights
        vector[float] centers
        vector[double] r2s
    void sqd_permute_rows(char* const* base, const size_t* row_bytes, int n_arrays,
                          intp_t start, const intp_t* perm, intp_t n) except + nogil
    void sqd_build_tree(const float* X, intp_t d, intp_t* perm, intp_t n, intp_t leaf_size,
                        SqdNodes& out, int n_threads, bint refined) except + nogil
    void sqd_build_tree(const double* X, intp_t d, intp_t* perm, intp_t n, intp_t leaf_size,
                        SqdNodes& out, int n_threads, bint refined) except + nogil
    double sqd_range_dist2(const float* X, intp_t d, intp_t start, intp_t end, const float* c,
                           double* dist) noexcept nogil
    double sqd_range_dist2(const double* X, intp_t d, intp_t start, intp_t end, const float* c,
                           double* dist) noexcept nogil
    void sqd_range_sum(const float* X, intp_t d, intp_t start, intp_t end,
                       double* sum) noexcept nogil
    void sqd_rel_codes(const float* p, const float* c, intp_t d, intp_t dpad8, double s4,
                       intp_t slot, uint8_t* rhi, uint8_t* rlo, uint8_t* r3,
                       double* sums) noexcept nogil
    void sqd_rel_codes(const double* p, const float* c, intp_t d, intp_t dpad8, double s4,
                       intp_t slot, uint8_t* rhi, uint8_t* rlo, uint8_t* r3,
                       double* sums) noexcept nogil
    double sqd_range_maxdiff(const float* X, intp_t d, const intp_t* ids, const float* ec,
                             intp_t start, intp_t end, const float* c, intp_t* n_live,
                             double* sum_ec) noexcept nogil
    double sqd_range_maxdiff(const double* X, intp_t d, const intp_t* ids, const float* ec,
                             intp_t start, intp_t end, const float* c, intp_t* n_live,
                             double* sum_ec) noexcept nogil
    void sqd_range_sum(const double* X, intp_t d, intp_t start, intp_t end,
                       double* sum) noexcept nogil


cdef double U64 = 1.1102230246251565e-16   # 2**-53
cdef double REL = 1e-9                      # relative widening of bound arithmetic
cdef double TINY = 1e-290                   # absolute widening (underflow)
# a thread keeps the capacity of its single-query result buffers up to this
# many ids (8 MiB; 16 MiB with scores)
cdef size_t SINGLE_KEEP = 1 << 20
cdef double INFL = 1.0 + 1e-10              # rounding-up factor for stored norms
cdef intp_t CHUNK = 256                     # leaf scan chunk (dots buffer size)
cdef intp_t VER_OFF = CHUNK + 16            # undecided positions in QueryBuf.pos
cdef intp_t MAX_SCREEN_D = 16384            # integer dots are exact up to this d
cdef intp_t MAX_DEPTH = 128
cdef intp_t PREFETCH_AHEAD = 6              # rows in flight while verifying
cdef intp_t NODE_AHEAD = 8                  # a walk fetches the centre this many nodes ahead
cdef double REL_GAIN = 0.5                  # leaf-relative codes used if C1 <= this * mean c_p
cdef double REL_GROW = 2.0                  # an update beyond this * C1 turns them off
cdef double INT_LIM = 1073741824.0          # 2**30 > every integer dot of the relative codes
cdef double INT_LIM40 = 1099511627776.0     # 2**40 > every stage-1 and stage-2 integer
# A relative leaf whose centre's score lies within its stage-0 band plus
# this many spreads (radius ||w|| / sqrt(d): the spread of the scores of
# isotropic points) of b skips stage 0 (see "Query side")
cdef double STAGE0_SKIP_SPREADS = 1.5
cdef intp_t REL_W = 7                       # floats per node in node_rel
cdef intp_t STAGE2_MIN_ROW = 512            # stage 2 runs if a row of X has this many bytes
cdef intp_t LAZY_ARITY = 3                  # lazy merging: segments merge like digits in base 3
cdef intp_t LAZY_ADDS_PER_QUERY = 32        # ... while rows added outnumber query rows this much
cdef intp_t MAX_TASKS = 64                  # subtrees a split single query is cut into
cdef intp_t SPLIT_MIN_WORK = 1 << 19         # a single query is split if straddling points * (d + 16) reach this
cdef intp_t SPLIT_SHARE = 4                 # ... into subtrees of at most 1 / (this * threads) each

# Modes of the query kernel.
cdef enum:
    MODE_COUNT = 0
    MODE_IDS = 1
    MODE_SCORES = 2


cdef struct CoreView:
    # A snapshot of raw pointers into the core's arrays, valid while no
    # mutation runs; lets nogil kernels read the structure.
    const void* X
    const uint8_t* codes    # blocked u8 codes (see sqd_range_dots)
    const float* scale
    const float* ea
    const float* ec
    const uint8_t* rows2    # level-2 rows: scale2, ec2 (float32), then dpad u8 codes
    const intp_t* ids
    const intp_t* node_start
    const intp_t* node_end
    const intp_t* node_right   # right child (local index), -1 for a leaf; left is +1
    const intp_t* node_alive
    const float* node_center
    const double* node_radius
    const double* node_cnorm
    const uint8_t* rhi      # leaf-relative codes, high nibble plane (blocked, dpad8 / 2 per slot)
    const uint8_t* rlo      # low nibble plane (same layout)
    const uint8_t* r3       # third-level nibble rows, point-major (dpad8 / 2 per slot)
    const float* node_rel   # per node (REL_W): s4 (0: relative codes off), A0, C0, A1, C1, A2, C2
    const intp_t* seg_node0
    const intp_t* seg_n_nodes
    intp_t n_segs
    intp_t d
    intp_t dpad
    intp_t stride2          # bytes per level-2 row: dpad + 8
    intp_t dpad8            # d rounded up to a multiple of 8 (nibble planes)
    intp_t r3w              # bytes per third-level row: dpad8 / 2, or 0 (no stage 2)
    double gam


cdef struct QueryBuf:
    # Per-thread scratch space for one query.
    double* w          # the query in float64 (d)
    int8_t* qw         # its int8 code, zero padded (dpad)
    int8_t* qw2        # int8 code of the residual w - t qw, at scale t2 (dpad)
    int32_t sumq128    # 128 * sum(qw): removes the +128 offset of the codes
    int32_t sumq2_128  # 128 * sum(qw2)
    int32_t* dots      # integer dots <q_p + 128, qw> of one leaf chunk (CHUNK + 16)
    int32_t* dots2     # integer dots <q_p + 128, qw2> of one leaf chunk (CHUNK + 16)
    int32_t* dots8     # stage-1 dots of the relative codes, 32 per block (2 (CHUNK + 16))
    intp_t doff        # position of the chunk's first slot in dots and dots2
    unsigned char* flag  # screening decisions of one chunk (CHUNK)
    int32_t* pos         # positions of accepted (at 0), undecided (at VER_OFF) points
    intp_t* stack      # DFS stack of node indices (MAX_DEPTH)
    double t           # query scale
    double t2          # scale of the second level, t / (2 qmax + 2)
    double wnorm       # upper bound on ||w||
    double A           # multiplier of a_p in the screening bound
    double enorm1      # upper bound on ||w - t qw|| (one query level: relative codes)
    double enorm2      # upper bound on ||w - t qw - t2 qw2|| (both levels)
    int32_t sumq2_8    # 8 * sum(qw2)
    int32_t sumq8      # 8 * sum(qw): removes the +8 offset of the nibbles
    # relative-code pipeline: slots awaiting stage 1 (with their leaf's
    # stage-1 and stage-2 thresholds), slots awaiting stage 2 (with their
    # stage-1 integer F), slots awaiting verification; each of the first two
    # queues holds slots of one leaf chunk
    intp_t* r1_slot
    intp_t r1_n
    int64_t r1_hi
    int64_t r1_lo
    int64_t r1_hi2
    int64_t r1_lo2
    bint r1_has_dead
    bint r1_dense      # the stage-1 slots are the whole chunk r1_s0 .. r1_s0 + r1_n - 1
    intp_t r1_s0       # the chunk start of the stage-1 slots
    int32_t* r_acc     # accepted positions of stage 1 or 2 (relative to their chunk start)
    intp_t* r2_slot
    double* r2_f
    intp_t r2_n
    int64_t r2_hi
    int64_t r2_lo
    bint r2_has_dead
    intp_t r2_s0
    intp_t* r3_slot
    intp_t r3_n
    double C           # multiplier of c_p in the screening bound
    bint use_f32       # classify in float32 (constants safely in range)
    float t32, t2_32, A32, C32   # float32 copies (A32, C32 rounded up)
    # work counters of the last query (cheap; read by query_stats)
    intp_t n_nodes
    intp_t n_screened
    intp_t n_refined
    intp_t n_refined2
    # slots undecided by their level-1 codes, with their two integer dots,
    # refined one chunk later (CHUNK)
    intp_t* pend
    int32_t* pend_d1
    int32_t* pend_d2
    intp_t n_pend
    intp_t n_verified
    intp_t n_bulk
    intp_t n_tasks     # subtrees a split query was cut into (0: not split)
    # top-k heap (search)
    double* hscore
    intp_t* hid
    intp_t hsize
    intp_t k


cdef inline float _round_up_f32(double x) noexcept nogil:
    """Smallest float32 >= x; inf if x overflows float32."""
    cdef float f = <float>x
    if <double>f < x:
        f = nextafterf(f, INFINITY)
    return f


cdef inline float _round_down_f32(double x) noexcept nogil:
    """Largest float32 <= x."""
    cdef float f = <float>x
    if <double>f > x:
        f = nextafterf(f, -INFINITY)
    return f


cdef float FLT_MIN = 1.1754943508222875e-38   # smallest normal float32


cdef double ROUND_MAGIC = 6755399441055744.0    # 1.5 * 2**52


cdef inline int _code(double x, double scale, int qmax) noexcept nogil:
    """round(x / scale) (half to even), clipped to [-qmax, qmax].

    For |x / scale| < 2**51, adding and subtracting 1.5 * 2**52 rounds to an
    integer exactly as ``nearbyint`` does (same rounding mode), without a
    library call; larger quotients are clipped anyway.
    """
    cdef double y = x / scale
    cdef double q
    if not (fabs(y) < 2251799813685248.0):       # 2**51 (or NaN)
        q = nearbyint(y)
    else:
        q = (y + ROUND_MAGIC) - ROUND_MAGIC
    if q > qmax:
        return qmax
    if q < -qmax:
        return -qmax
    return <int>q


cdef void _encode_point(const floating* p, intp_t d, intp_t dpad, uint8_t* codes,
                        intp_t slot, float* scale, float* ea, float* ec,
                        uint8_t* row2) noexcept nogil:
    """Codes, scales and error constants of one slot (see the design notes).

    The level-1 codes are written into the blocked layout at ``slot``, the
    level-2 scale, error bound and codes into the row ``row2`` (8 + dpad bytes).
    """
    cdef intp_t j
    cdef double maxabs = 0.0, v, s, qn2 = 0.0, en2 = 0.0, maxe = 0.0, e2n2 = 0.0
    cdef float s32, s2_32
    cdef uint8_t* base = codes + (slot >> 4) * 16 * dpad + (slot & 15) * 4
    cdef float* scale2 = <float*>row2
    cdef float* ec2 = <float*>row2 + 1
    cdef uint8_t* codes2 = row2 + 8
    for j in range(d):
        v = fabs(<double>p[j])
        if v > maxabs:
            maxabs = v
    s = maxabs / 127.0
    s32 = <float>s
    for j in range(dpad):
        base[(j >> 2) * 64 + (j & 3)] = 128          # q = 0
        codes2[j] = 128
    scale2[0] = 0.0
    if maxabs == 0.0:
        scale[0] = 0.0
        ea[0] = 0.0
        ec[0] = 0.0
        ec2[0] = 0.0
        return
    if not (s32 >= FLT_MIN and s32 < 3.0e38) or d > MAX_SCREEN_D:
        # Scale not a normal float32 (tiny or huge float64 data), or d too
        # large for exact int32 dots: no screening, the infinite bound sends
        # the point to exact verification.
        scale[0] = 0.0
        ea[0] = INFINITY
        ec[0] = INFINITY
        ec2[0] = INFINITY
        return
    # level-1 codes into codes2 (contiguous, so the loop vectorises), then
    # into the blocked layout; e = p - s32 q: s32 * q is exact in float64
    # (24 + 7 bits), the subtraction rounds once, relative to |e|
    sqd_encode_level1(p, d, <double>s32, codes2, &qn2, &en2, &maxe)
    for j in range(d):
        base[(j >> 2) * 64 + (j & 3)] = codes2[j]
    scale[0] = s32
    ea[0] = _round_up_f32(<double>s32 * sqrt(qn2) * INFL)
    # at least the smallest normal float32, so that flushing subnormals to
    # zero (FTZ/DAZ) can never shrink a bound
    ec[0] = max(_round_up_f32(sqrt(en2) * INFL + d * TINY), FLT_MIN)
    # Level 2: the residual e = p - s32 q coded again, e = s2 q2 + e2.
    s2_32 = <float>(maxe / 127.0)
    if maxe == 0.0 or not s2_32 >= FLT_MIN:
        # no level 2: codes2 back to q = 0; with s2 not a normal float32
        # the refinement can never decide this point
        for j in range(d):
            codes2[j] = 128
        ec2[0] = FLT_MIN if maxe == 0.0 else INFINITY
        return
    # level 2 in place of the level-1 codes in codes2: e = p - s32 q as above,
    # bit for bit; the computed e and e2 each err by at most u |.|: the 2u
    # ||e|| below covers both (||e|| >= ||e2|| up to rounding)
    e2n2 = sqd_encode_level2(p, d, <double>s32, <double>s2_32, codes2)
    scale2[0] = s2_32
    ec2[0] = max(_round_up_f32(sqrt(e2n2) * INFL + 4.0 * U64 * sqrt(en2) + d * TINY),
                 FLT_MIN)


cdef void _prepare_query(QueryBuf* qb, intp_t d, intp_t dpad, double gam) noexcept nogil:
    """Quantise qb.w to two int8 levels and set the bound multipliers A and C."""
    cdef intp_t j
    cdef double maxabs = 0.0, v, w2 = 0.0, e2 = 0.0, e1 = 0.0, e, t, t2, wnorm, enorm
    cdef long qv, sumq = 0, sumq2 = 0
    cdef int qmax = sqd_qmax()
    for j in range((d + 7) // 8 * 8):      # up to dpad8 (nibble planes)
        qb.qw[j] = 0
        qb.qw2[j] = 0
    for j in range(d):
        v = fabs(qb.w[j])
        w2 += qb.w[j] * qb.w[j]
        if v > maxabs:
            maxabs = v
    t = maxabs / qmax
    t2 = t / (2 * qmax + 2)      # a power of two: exact
    wnorm = sqrt(w2) * INFL + d * TINY
    if t == 0.0 or not (t > 1e-290) or d > MAX_SCREEN_D:
        # zero (or denormal-scale) query: no integer screening information
        t = t2 = 0.0
        enorm = wnorm
        qb.enorm1 = wnorm
    else:
        # w = t qw + t2 qw2 + e2, |w - t qw| <= t / 2 so |qw2| <= qmax + 1
        # before clipping (and clipping only grows e2, which is measured).
        for j in range(d):
            qv = _code(qb.w[j], t, qmax)
            qb.qw[j] = <int8_t>qv
            sumq += qv
            e = qb.w[j] - t * <double>qv
            e1 += e * e
            qv = _code(e, t2, qmax)
            qb.qw2[j] = <int8_t>qv
            sumq2 += qv
            e = e - t2 * <double>qv
            e2 += e * e
        # Each of the four roundings in computing e2_j errs by at most
        # u (|w_j| + t): 8 u (||w|| + t sqrt(d)) bounds the error of the norm.
        enorm = sqrt(e2) * INFL + 8.0 * U64 * (wnorm + t * sqrt(<double>d)) + d * TINY
        # e1_j = w_j - t qw_j rounds twice, each by at most u (|w_j| + t)
        qb.enorm1 = sqrt(e1) * INFL + 4.0 * U64 * (wnorm + t * sqrt(<double>d)) + d * TINY
    qb.t = t
    qb.t2 = t2
    qb.enorm2 = enorm
    qb.sumq2_8 = <int32_t>(8 * sumq2)
    qb.sumq128 = <int32_t>(128 * sumq)
    qb.sumq2_128 = <int32_t>(128 * sumq2)
    qb.sumq8 = <int32_t>(8 * sumq)
    qb.wnorm = wnorm
    qb.A = enorm + gam * wnorm
    qb.C = wnorm * INFL + gam * wnorm
    # float32 classification is safe when every per-query constant is a
    # normal float32 far from overflow (per-point products then stay finite
    # or become inf/NaN, which means "verify").
    qb.use_f32 = (1e-30 < t2 and t < 1e30 and 1e-30 < qb.A < 1e30 and qb.C < 1e30)
    qb.t32 = <float>t
    qb.t2_32 = <float>t2
    qb.A32 = _round_up_f32(qb.A)
    qb.C32 = _round_up_f32(qb.C)


cdef inline double _node_bounds(const CoreView* v, intp_t node, const QueryBuf* qb,
                                double* lo, double* hi) noexcept nogil:
    """Rigorous bounds on score(p, w) over the node's ball; returns the
    computed <c, w> (within gam ||c|| ||w|| of the real value)."""
    cdef double cw = sqd_xdot(v.node_center + node * v.d, qb.w, v.d)
    cdef double r = v.node_radius[node]
    cdef double half = r * qb.wnorm
    cdef double slack = v.gam * (v.node_cnorm[node] + r) * qb.wnorm * 2.0
    half = (half + slack) * (1.0 + REL) + REL * fabs(cw) + TINY
    lo[0] = cw - half
    hi[0] = cw + half
    return cw


# ---------------------------------------------------------------------------
# top-k heap: a min-heap on (score, -id), i.e. the root is the worst kept hit
# (lowest score; among equal scores the largest id).

cdef inline bint _worse(double s1, intp_t i1, double s2, intp_t i2) noexcept nogil:
    return s1 < s2 or (s1 == s2 and i1 > i2)


cdef void _heap_push(QueryBuf* qb, double s, intp_t i) noexcept nogil:
    """Offer (s, i) to the bounded heap."""
    cdef intp_t pos, parent
    cdef double* hs = qb.hscore
    cdef intp_t* hi = qb.hid
    if qb.hsize < qb.k:
        pos = qb.hsize
        qb.hsize += 1
        while pos > 0:             # sift up
            parent = (pos - 1) // 2
            if _worse(s, i, hs[parent], hi[parent]):
                hs[pos] = hs[parent]
                hi[pos] = hi[parent]
                pos = parent
            else:
                break
        hs[pos] = s
        hi[pos] = i
        return
    if not _worse(hs[0], hi[0], s, i):
        return
    _sift_down_from_root(hs, hi, qb.hsize, s, i)


cdef inline void _sift_down_from_root(double* hs, intp_t* hi, intp_t n,
                                      double s, intp_t i) noexcept nogil:
    """Put (s, i) in place of the root of the n-entry heap and restore the order."""
    cdef intp_t pos = 0, child
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n and _worse(hs[child + 1], hi[child + 1], hs[child], hi[child]):
            child += 1
        if _worse(hs[child], hi[child], s, i):
            hs[pos] = hs[child]
            hi[pos] = hi[child]
            pos = child
        else:
            break
    hs[pos] = s
    hi[pos] = i


cdef inline bint _heap_prunes(const QueryBuf* qb, double upper) noexcept nogil:
    """True if nothing with score <= upper can enter the full heap."""
    return qb.hsize == qb.k and upper < qb.hscore[0]


# ---------------------------------------------------------------------------
# query kernels

cdef inline void _chunk_dots(const CoreView* v, QueryBuf* qb, intp_t s0,
                             intp_t s1) noexcept nogil:
    """Integer dots of slots [s0, s1) (at most CHUNK) with both query codes,
    in qb.dots and qb.dots2 from position qb.doff; the exact dots are these
    minus qb.sumq128 and qb.sumq2_128."""
    if qb.t == 0.0:
        memset(qb.dots, 0, (s1 - s0) * sizeof(int32_t))
        memset(qb.dots2, 0, (s1 - s0) * sizeof(int32_t))
        qb.doff = 0
    else:
        qb.doff = sqd_range_dots(v.codes, v.dpad, s0, s1, qb.qw, qb.qw2, qb.dots, qb.dots2)


cdef inline void _classify_chunk(const CoreView* v, QueryBuf* qb, intp_t s, intp_t n,
                                 intp_t off, double b, intp_t* n_acc,
                                 intp_t* n_ver) noexcept nogil:
    """Screen slots [s, s + n) from their integer dots (at qb.dots + off and
    qb.dots2 + off): positions (relative to s) of the surely accepted into
    qb.pos, of the undecided into qb.pos + VER_OFF."""
    if qb.use_f32 and fabs(b) < 1e30:
        sqd_screen_f32(qb.dots + off, qb.dots2 + off, qb.sumq128, qb.sumq2_128, n,
                       v.scale + s, v.ea + s, v.ec + s,
                       qb.t32, qb.t2_32, qb.A32, qb.C32, _round_up_f32(b),
                       _round_down_f32(b), 1e-6, 1e-37, qb.flag, qb.pos, n_acc,
                       qb.pos + VER_OFF, n_ver)
    else:
        sqd_classify(qb.dots + off, qb.dots2 + off, qb.sumq128, qb.sumq2_128, n,
                     v.scale + s, v.ea + s, v.ec + s,
                     qb.t, qb.t2, qb.A, qb.C, b, REL, TINY, qb.flag)
        sqd_split_flags(qb.flag, n, qb.pos, n_acc, qb.pos + VER_OFF, n_ver)


cdef inline int _refine(const CoreView* v, const QueryBuf* qb, intp_t s, int32_t d1,
                        int32_t d2, double b) noexcept nogil:
    """Second screening of live slot s (undecided by its level-1 code) with
    its level-2 code: 2 = surely score >= b, 0 = surely below, 1 = verify."""
    cdef int32_t e1, e2
    cdef double x1, x2, y1, y2, approx, mag, m
    cdef const uint8_t* row = v.rows2 + s * v.stride2
    cdef double scale2 = (<const float*>row)[0], ec2 = (<const float*>row)[1]
    sqd_row_dots(row + 8, v.dpad, qb.qw, qb.qw2, qb.sumq128, qb.sumq2_128, &e1, &e2)
    x1 = qb.t * <double>d1
    x2 = qb.t2 * <double>d2
    y1 = qb.t * <double>e1
    y2 = qb.t2 * <double>e2
    approx = <double>v.scale[s] * (x1 + x2) + scale2 * (y1 + y2)
    mag = <double>v.scale[s] * (fabs(x1) + fabs(x2)) + scale2 * (fabs(y1) + fabs(y2))
    # a2_p = s2_p ||q2_p|| <= ||e_p|| + ||e2_p|| <= ec + ec2; a tombstone's
    # NaN ea makes m NaN: undecided
    m = (((<double>v.ea[s] + <double>v.ec[s] + ec2) * qb.A + ec2 * qb.C) * (1.0 + REL)
         + REL * mag + TINY)
    if approx - m >= b:
        return 2
    if approx + m < b:
        return 0
    return 1


cdef inline intp_t _verify_slot(const CoreView* v, const floating* X, QueryBuf* qb, intp_t s,
                               double b, int mode, vector[intp_t]* out_ids,
                               vector[double]* out_sc) noexcept nogil:
    """Exact verification of slot s (skipped if a tombstone): reports it
    if score >= b; returns 1 if reported."""
    cdef double score
    if v.ids[s] < 0:
        return 0
    qb.n_verified += 1
    score = sqd_xdot(X + s * v.d, qb.w, v.d)
    if score < b:
        return 0
    if mode == MODE_SCORES:
        out_sc.push_back(score)
    if mode != MODE_COUNT:
        out_ids.push_back(v.ids[s])
    return 1


cdef intp_t _refine_pending(const CoreView* v, const floating* X, QueryBuf* qb, double b,
                            int mode, vector[intp_t]* out_ids,
                            vector[double]* out_sc) noexcept nogil:
    """Decide the pending slots (undecided by their level-1 codes, level-2
    rows prefetched): refine them, verify exactly what is left."""
    cdef intp_t i, s, n_left = 0, cnt = 0, n = qb.n_pend, d = v.d
    cdef int f
    cdef intp_t* pend = qb.pend
    if qb.t != 0.0:
        qb.n_refined += n
        for i in range(n):
            s = pend[i]
            f = _refine(v, qb, s, qb.pend_d1[i], qb.pend_d2[i], b)
            if f == 2:
                if mode == MODE_SCORES:
                    out_sc.push_back(sqd_xdot(X + s * d, qb.w, d))
                if mode != MODE_COUNT:
                    out_ids.push_back(v.ids[s])
                cnt += 1
            pend[n_left] = s
            n_left += (f == 1)
    else:
        n_left = n
    # still undecided (and tombstones): verify exactly, rows prefetched
    # PREFETCH_AHEAD ahead
    for i in range(min(n_left, PREFETCH_AHEAD)):
        sqd_prefetch_row(<const char*>(X + pend[i] * d), d * sizeof(floating))
    for i in range(n_left):
        if i + PREFETCH_AHEAD < n_left:
            sqd_prefetch_row(<const char*>(X + pend[i + PREFETCH_AHEAD] * d),
                             d * sizeof(floating))
        cnt += _verify_slot(v, X, qb, pend[i], b, mode, out_ids, out_sc)
    qb.n_pend = 0
    return cnt


cdef intp_t _scan_range(const CoreView* v, const floating* X, QueryBuf* qb,
                        intp_t start, intp_t end, double b, int mode,
                        vector[intp_t]* out_ids, vector[double]* out_sc) noexcept nogil:
    """Screen slots [start, end) through their codes; refine the band with
    the level-2 codes, one chunk later (so that their rows, prefetched when
    the chunk is screened, have arrived); verify what is left exactly."""
    cdef intp_t d = v.d, s0, s1, s, cnt = 0, n_acc, n_ver, i
    cdef size_t old
    cdef intp_t* dst
    cdef int32_t* ver = qb.pos + VER_OFF
    s0 = start
    while s0 < end:
        s1 = s0 + CHUNK
        if s1 > end:
            s1 = end
        _chunk_dots(v, qb, s0, s1)
        qb.n_screened += s1 - s0
        _classify_chunk(v, qb, s0, s1 - s0, qb.doff, b, &n_acc, &n_ver)
        # accepted: surely in the half-space (never a tombstone: NaN ea)
        if mode != MODE_COUNT and n_acc > 0:
            old = out_ids.size()
            out_ids.resize(old + n_acc)
            dst = out_ids.data() + old
            for i in range(n_acc):
                dst[i] = v.ids[s0 + qb.pos[i]]
            if mode == MODE_SCORES:
                sqd_prefetch_rows(<const char*>X, d * sizeof(floating), s0, qb.pos, n_acc)
                for i in range(n_acc):
                    out_sc.push_back(sqd_xdot(X + (s0 + qb.pos[i]) * d, qb.w, d))
        cnt += n_acc
        # the previous chunk's undecided, then this chunk's become pending
        if qb.n_pend > 0:
            cnt += _refine_pending(v, X, qb, b, mode, out_ids, out_sc)
        for i in range(n_ver):
            s = s0 + ver[i]
            qb.pend[i] = s
            qb.pend_d1[i] = qb.dots[qb.doff + ver[i]] - qb.sumq128
            qb.pend_d2[i] = qb.dots2[qb.doff + ver[i]] - qb.sumq2_128
            sqd_prefetch_span(<const char*>(v.rows2 + s * v.stride2), v.stride2)
        qb.n_pend = n_ver
        s0 = s1
    if qb.n_pend > 0:
        cnt += _refine_pending(v, X, qb, b, mode, out_ids, out_sc)
    return cnt



cdef inline bint _int_thresholds(double cw, double b, double M, double unit, double lim,
                                 int64_t* hi, int64_t* lo) noexcept nogil:
    """Integer thresholds for a relative-code screen of ``cw + unit D`` with
    error bound M (all in real arithmetic): ``D >= hi`` implies
    ``cw + unit D - M >= b`` and ``D < lo`` implies ``cw + unit D + M < b``,
    for every integer D with |D| < lim (thresholds are clamped to +-lim).
    False if they cannot be formed (unit not a safe positive number, NaN)."""
    cdef double err, xh, xl
    if not (unit > 1e-280 and unit < 1e280):
        return False
    # the two sums round by at most u of their magnitudes each; the
    # divisions (and unit = s4 t) by u relative: 1e-12 covers them
    err = REL * (fabs(b) + fabs(cw) + M) + TINY
    xh = ((b - cw) + M + err) / unit
    xl = ((b - cw) - M - err) / unit
    if xh != xh or xl != xl:
        return False
    xh += fabs(xh) * 1e-12
    xl -= fabs(xl) * 1e-12
    hi[0] = <int64_t>(lim if xh > lim else (-lim if xh < -lim else ceil(xh)))
    lo[0] = <int64_t>(lim if xl > lim else (-lim if xl < -lim else floor(xl)))
    return True


cdef inline intp_t _emit_slots(const CoreView* v, const floating* X, const QueryBuf* qb,
                               intp_t s0, const int32_t* pos, intp_t n, bint has_dead,
                               int mode, vector[intp_t]* out_ids,
                               vector[double]* out_sc) noexcept nogil:
    """Report slots s0 + pos[0..n) (surely in the half-space), skipping
    tombstones when the leaf has any; returns how many were reported."""
    cdef intp_t i, s, cnt = 0
    cdef size_t old
    cdef intp_t* dst
    if not has_dead and mode == MODE_COUNT:
        return n
    if not has_dead and mode == MODE_IDS:
        old = out_ids.size()
        out_ids.resize(old + n)
        dst = out_ids.data() + old
        for i in range(n):
            dst[i] = v.ids[s0 + pos[i]]
        return n
    for i in range(n):
        s = s0 + pos[i]
        if has_dead and v.ids[s] < 0:
            continue
        if mode == MODE_SCORES:
            out_sc.push_back(sqd_xdot(X + s * v.d, qb.w, v.d))
        if mode != MODE_COUNT:
            out_ids.push_back(v.ids[s])
        cnt += 1
    return cnt


cdef intp_t _rel_verify(const CoreView* v, const floating* X, QueryBuf* qb, double b,
                        int mode, vector[intp_t]* out_ids,
                        vector[double]* out_sc) noexcept nogil:
    """Verify exactly the slots queued by stage 2 (their rows were
    prefetched one chunk earlier); empties the queue."""
    cdef intp_t i, cnt = 0
    for i in range(qb.r3_n):
        cnt += _verify_slot(v, X, qb, qb.r3_slot[i], b, mode, out_ids, out_sc)
    qb.r3_n = 0
    return cnt


cdef intp_t _rel_stage2(const CoreView* v, const floating* X, QueryBuf* qb, int mode,
                        vector[intp_t]* out_ids, vector[double]* out_sc) noexcept nogil:
    """Stage 2 of the slots left undecided by stage 1 one chunk earlier
    (their third-level rows prefetched then): with q12 = 16 q8 + q_3,
    F3 = <q12, K qw + qw2> = 16 F + <q_3, K qw + qw2> is exact in int64.
    Accepted slots are reported, undecided ones queued for verification
    (rows of X prefetched); empties the stage-2 queue, which holds slots of
    one leaf chunk (thresholds r2_hi, r2_lo)."""
    cdef intp_t i, s, n = qb.r2_n, n_acc = 0, nv = qb.r3_n
    cdef int64_t K = 2 * sqd_qmax() + 2, f3
    cdef int32_t o1, o2
    cdef int32_t* acc = qb.r_acc
    if n == 0:
        return 0
    for i in range(n):
        s = qb.r2_slot[i]
        sqd_row3_dots(v.r3 + s * v.r3w, v.dpad8, qb.qw, qb.qw2, &o1, &o2)
        # |F| < 2**37 is held exactly by r2_f; the +8 offsets of the nibbles
        # are removed with sumq8, sumq2_8
        f3 = (16 * <int64_t>qb.r2_f[i] + K * <int64_t>(o1 - qb.sumq8)
              + <int64_t>(o2 - qb.sumq2_8))
        if f3 >= qb.r2_hi:
            acc[n_acc] = <int32_t>(s - qb.r2_s0)
            n_acc += 1
        elif f3 >= qb.r2_lo:
            qb.r3_slot[nv] = s
            nv += 1
            sqd_prefetch_span_l2(<const char*>(X + s * v.d), v.d * sizeof(floating))
    qb.r3_n = nv
    qb.n_refined2 += n
    qb.r2_n = 0
    return _emit_slots(v, X, qb, qb.r2_s0, acc, n_acc, qb.r2_has_dead, mode, out_ids, out_sc)


cdef intp_t _rel_stage1(const CoreView* v, const floating* X, QueryBuf* qb, int mode,
                        vector[intp_t]* out_ids, vector[double]* out_sc) noexcept nogil:
    """Stage 1 of the slots left undecided by stage 0 one chunk earlier:
    with q8 = 16 q_hi + q_lo and K = 2 qmax + 2 (so t = K t2), F = <q8, K
    qw + qw2> is exact in int64.
    Accepted slots are reported, undecided ones queued for stage 2 (their
    third-level rows prefetched) or, without stage 2, for verification
    (rows of X prefetched); empties the stage-1 queue, which holds slots of
    one leaf chunk (thresholds r1_hi, r1_lo)."""
    cdef bint stage2 = v.r3w > 0
    cdef intp_t i, j, blk, n = qb.r1_n, n_acc = 0
    cdef intp_t nv0 = qb.r2_n if stage2 else qb.r3_n
    cdef intp_t nv = nv0
    cdef intp_t base = qb.r1_s0, dpad8 = v.dpad8, b0, b1, n_blk
    cdef int64_t K = 2 * sqd_qmax() + 2
    cdef const intp_t* slot = qb.r1_slot
    cdef int32_t* dots = qb.dots8
    cdef int32_t* acc = qb.r_acc
    cdef intp_t* ver = qb.r2_slot if stage2 else qb.r3_slot
    if n == 0:
        return 0
    # the +136 offsets of the merged bytes: 136 = 17 * 8
    if qb.r1_dense:
        # a whole chunk whose leaf skipped stage 0
        b0 = base >> 4
        sqd_stage1_whole(v.rhi + b0 * 8 * dpad8, v.rlo + b0 * 8 * dpad8, dpad8, base, n, qb.qw,
                         qb.qw2, dots, 17 * qb.sumq8, 17 * qb.sumq2_8, K, qb.r1_hi, qb.r1_lo,
                         base, acc, &n_acc, ver, qb.r2_f, &nv)
    else:
        # the blocks holding these slots (the high plane was read by stage
        # 0): one call over their whole span if they fill at least half of
        # it, else one call per block
        b0 = slot[0] >> 4
        b1 = (slot[n - 1] >> 4) + 1
        n_blk = 1
        for i in range(1, n):
            n_blk += (slot[i] >> 4) != (slot[i - 1] >> 4)
        if 2 * n_blk >= b1 - b0:
            sqd_nib_dots8(v.rhi + b0 * 8 * dpad8, v.rlo + b0 * 8 * dpad8, b1 - b0, dpad8,
                          qb.qw, qb.qw2, dots)
        else:
            blk = -1
            for i in range(n):
                if (slot[i] >> 4) != blk:
                    blk = slot[i] >> 4
                    sqd_nib_dots8(v.rhi + blk * 8 * dpad8, v.rlo + blk * 8 * dpad8, 1, dpad8,
                                  qb.qw, qb.qw2, dots + 32 * (blk - b0))
        sqd_stage1(slot, n, dots, b0, 17 * qb.sumq8, 17 * qb.sumq2_8, K, qb.r1_hi, qb.r1_lo,
                   base, acc, &n_acc, ver, qb.r2_f, &nv)
    if stage2:
        for j in range(nv0, nv):
            sqd_prefetch_span_l2(<const char*>(v.r3 + ver[j] * v.r3w), v.r3w)
        qb.r2_n = nv
        qb.r2_hi = qb.r1_hi2
        qb.r2_lo = qb.r1_lo2
        qb.r2_has_dead = qb.r1_has_dead
        qb.r2_s0 = base
    else:
        for j in range(nv0, nv):
            sqd_prefetch_span_l2(<const char*>(X + ver[j] * v.d), v.d * sizeof(floating))
        qb.r3_n = nv
    qb.n_refined += n
    qb.r1_n = 0
    return _emit_slots(v, X, qb, base, acc, n_acc, qb.r1_has_dead, mode, out_ids, out_sc)


cdef intp_t _rel_flush(const CoreView* v, const floating* X, QueryBuf* qb, double b,
                       int mode, vector[intp_t]* out_ids,
                       vector[double]* out_sc) noexcept nogil:
    """Finish the relative-code pipeline (end of a query)."""
    cdef intp_t cnt = _rel_verify(v, X, qb, b, mode, out_ids, out_sc)
    cnt += _rel_stage2(v, X, qb, mode, out_ids, out_sc)
    cnt += _rel_verify(v, X, qb, b, mode, out_ids, out_sc)
    cnt += _rel_stage1(v, X, qb, mode, out_ids, out_sc)
    cnt += _rel_stage2(v, X, qb, mode, out_ids, out_sc)
    return cnt + _rel_verify(v, X, qb, b, mode, out_ids, out_sc)


cdef intp_t _scan_leaf_rel(const CoreView* v, const floating* X, QueryBuf* qb, intp_t node,
                           double cw, double b, int mode, vector[intp_t]* out_ids,
                           vector[double]* out_sc) noexcept nogil:
    """Screen a leaf through its leaf-relative codes: stage 0 here (high
    nibbles, integer thresholds); the undecided slots go through a pipeline
    in which each step runs one chunk later than the one before, so that the
    memory it reads has arrived: stage 1 (both nibbles, the blocks holding
    undecided slots), stage 2 (the third-level rows of undecided slots),
    then exact verification.  Returns the count reported so far, or -1
    (nothing done) if the thresholds cannot be formed."""
    cdef const float* rel = v.node_rel + REL_W * node
    cdef double s4 = rel[0]
    cdef double slack = v.gam * (2.0 * v.node_cnorm[node] + v.node_radius[node]) * qb.wnorm
    cdef double M0 = ((<double>rel[1] * qb.enorm1 + <double>rel[2] * qb.wnorm + slack)
                      * (1.0 + REL) + TINY)
    cdef double M1 = ((<double>rel[3] * qb.enorm2 + <double>rel[4] * qb.wnorm + slack)
                      * (1.0 + REL) + TINY)
    cdef double M2 = ((<double>rel[5] * qb.enorm2 + <double>rel[6] * qb.wnorm + slack)
                      * (1.0 + REL) + TINY)
    cdef int64_t hi0, lo0, hi1, lo1, hi2, lo2
    cdef int32_t sub = qb.sumq8
    cdef intp_t start = v.node_start[node], end = v.node_end[node]
    cdef intp_t s0, s1, off, n_acc, n_ver, i, cnt = 0
    cdef bint has_dead = v.node_alive[node] < end - start
    cdef int32_t* acc = qb.pos
    cdef int32_t* ver = qb.pos + VER_OFF
    if qb.t == 0.0:
        return -1
    # stage 0: |D0| <= 7 * 127 * 16384 < 2**30; with K = 2 qmax + 2 <= 256
    # and |qw2| <= qmax + 1, |K qw + qw2| <= 32640 per feature, so stage 1:
    # |F| <= 120 * 32640 * 16384 < 2**36 (|q8| <= 120) and stage 2: |F3| <=
    # 1928 * 32640 * 16384 < 2**40 (|q12| <= 1928)
    if not _int_thresholds(cw, b, M0, s4 * qb.t, INT_LIM, &hi0, &lo0):
        return -1
    if not _int_thresholds(cw, b, M1, (s4 / 16.0) * qb.t2, INT_LIM40, &hi1, &lo1):
        return -1
    hi2 = lo2 = 0
    if v.r3w > 0 and not _int_thresholds(cw, b, M2, (s4 / 256.0) * qb.t2, INT_LIM40, &hi2,
                                         &lo2):
        return -1
    # Near b nearly every block would hold a slot that stage 0 leaves
    # undecided (and go to stage 1 anyway): such a leaf skips stage 0
    cdef double spread = v.node_radius[node] * qb.wnorm / sqrt(<double>v.d)
    cdef bint skip0 = fabs(cw - b) < M0 + STAGE0_SKIP_SPREADS * spread
    s0 = start
    while s0 < end:
        s1 = min(s0 + CHUNK, end)
        qb.n_screened += s1 - s0
        if not skip0:
            off = sqd_nib_range_dots(v.rhi, v.dpad8, s0, s1, qb.qw, qb.dots)
            # stage 0: the dots carry +8 per nibble; |hi0|, |lo0| <= 2**30
            # and |sub| < 2**24, so the shifted thresholds fit int32
            sqd_screen_int(qb.dots + off, s1 - s0, <int32_t>hi0 + sub, <int32_t>lo0 + sub, acc,
                           &n_acc, ver, &n_ver)
            cnt += _emit_slots(v, X, qb, s0, acc, n_acc, has_dead, mode, out_ids, out_sc)
        # the pipeline advances: verification, then stage 2 of the chunk
        # before the previous one, then stage 1 of the previous chunk
        cnt += _rel_verify(v, X, qb, b, mode, out_ids, out_sc)
        cnt += _rel_stage2(v, X, qb, mode, out_ids, out_sc)
        cnt += _rel_stage1(v, X, qb, mode, out_ids, out_sc)
        # this chunk's stage 1: its undecided slots, or all of it
        qb.r1_dense = skip0
        if skip0:
            qb.r1_n = s1 - s0
        else:
            for i in range(n_ver):
                qb.r1_slot[i] = s0 + ver[i]
            qb.r1_n = n_ver
        qb.r1_hi = hi1
        qb.r1_lo = lo1
        qb.r1_hi2 = hi2
        qb.r1_lo2 = lo2
        qb.r1_has_dead = has_dead
        qb.r1_s0 = s0
        s0 = s1
    return cnt


cdef intp_t _report_node(const CoreView* v, const floating* X, QueryBuf* qb,
                         intp_t node, int mode, vector[intp_t]* out_ids,
                         vector[double]* out_sc) noexcept nogil:
    """Report every live slot of ``node``, which lies inside the half-space."""
    cdef intp_t s, cnt = 0, start = v.node_start[node], end = v.node_end[node]
    cdef size_t old
    if mode == MODE_IDS and v.node_alive[node] == end - start:
        old = out_ids.size()                 # no tombstones: one copy
        out_ids.resize(old + (end - start))
        memcpy(out_ids.data() + old, v.ids + start, (end - start) * sizeof(intp_t))
        return end - start
    for s in range(start, end):
        if v.ids[s] < 0:
            continue
        if mode == MODE_SCORES:
            out_sc.push_back(sqd_xdot(X + s * v.d, qb.w, v.d))
        out_ids.push_back(v.ids[s])
        cnt += 1
    return cnt


cdef inline void _prefetch_node(const CoreView* v, intp_t node) noexcept nogil:
    sqd_prefetch_span_l2(<const char*>(v.node_center + node * v.d), v.d * sizeof(float))
    if v.node_right[node] < 0 and v.node_rel[REL_W * node] > 0.0:
        sqd_prefetch_span_l2(<const char*>(v.rhi + (v.node_start[node] >> 4) * 8 * v.dpad8),
                             min(8 * v.dpad8, 512))


cdef inline intp_t _settle_node(const CoreView* v, const floating* X, QueryBuf* qb,
                                intp_t node, double b, int mode, double* cw,
                                vector[intp_t]* out_ids,
                                vector[double]* out_sc) noexcept nogil:
    """Decide a node by its ball bound.  If that settles it (no live
    points, outside the half-space, or inside it and reported or counted
    whole), returns the points reported (>= 0); if it straddles ``b``,
    returns -1 with its centre's ``<c, w>`` in ``cw``."""
    cdef intp_t alive = v.node_alive[node]
    cdef double lo, hi
    if alive == 0:
        return 0
    cw[0] = _node_bounds(v, node, qb, &lo, &hi)
    qb.n_nodes += 1
    if hi < b:
        return 0
    if lo >= b:
        qb.n_bulk += alive
        if mode == MODE_COUNT:
            return alive
        return _report_node(v, X, qb, node, mode, out_ids, out_sc)
    return -1


cdef intp_t _walk(const CoreView* v, const floating* X, QueryBuf* qb, double b, int mode,
                  intp_t node0, intp_t root, vector[intp_t]* out_ids,
                  vector[double]* out_sc) noexcept nogil:
    """Report (or count) the points with score >= b in the subtree of the
    segment whose nodes start at node0, from its local node ``root``
    (bounded again here); the query must be prepared.  Slots left in the
    relative-code pipeline wait for ``_rel_flush``."""
    cdef intp_t node, top, cnt = 0
    cdef intp_t pend_start = 0, pend_end = 0     # pending run of leaves to screen
    cdef double cw
    cdef intp_t rcnt
    qb.stack[0] = root
    top = 1
    while top > 0:
        top -= 1
        node = node0 + qb.stack[top]
        # a walk visits nodes in preorder, i.e. in memory order, skipping
        # the subtrees it settles: fetch the centre NODE_AHEAD nodes ahead
        sqd_prefetch_span_l2(<const char*>(v.node_center + (node + NODE_AHEAD) * v.d),
                             v.d * sizeof(float))
        rcnt = _settle_node(v, X, qb, node, b, mode, &cw, out_ids, out_sc)
        if rcnt >= 0:
            cnt += rcnt
            continue
        if v.node_right[node] < 0:
            if v.node_rel[REL_W * node] > 0.0:
                # leaf-relative codes (this leaf's points lie close to
                # its centre); -1: this query cannot use them
                rcnt = _scan_leaf_rel(v, X, qb, node, cw, b, mode, out_ids, out_sc)
                if rcnt >= 0:
                    cnt += rcnt
                    continue
            # Leaves come in slot order: runs of adjacent leaves are
            # screened in one pass (long chunks vectorise better).
            if v.node_start[node] != pend_end:
                if pend_end > pend_start:
                    cnt += _scan_range(v, X, qb, pend_start, pend_end, b, mode,
                                       out_ids, out_sc)
                pend_start = v.node_start[node]
            pend_end = v.node_end[node]
            continue
        qb.stack[top + 1] = qb.stack[top] + 1           # left child, visited first
        qb.stack[top] = v.node_right[node]
        top += 2
        # both children will be bounded: fetch their centres into L2, and
        # the start of a relative leaf's high plane
        _prefetch_node(v, node + 1)
        _prefetch_node(v, node0 + v.node_right[node])
    if pend_end > pend_start:
        cnt += _scan_range(v, X, qb, pend_start, pend_end, b, mode, out_ids, out_sc)
    return cnt


cdef inline void _reset_counters(QueryBuf* qb) noexcept nogil:
    qb.n_nodes = qb.n_screened = qb.n_refined = qb.n_refined2 = qb.n_verified = 0
    qb.n_bulk = qb.n_tasks = 0
    qb.n_pend = qb.r1_n = qb.r2_n = qb.r3_n = 0


cdef intp_t _query_one(const CoreView* v, const floating* X, QueryBuf* qb, double b,
                       int mode, vector[intp_t]* out_ids,
                       vector[double]* out_sc) noexcept nogil:
    """Report (or count) the points with score >= b; qb.w must be set."""
    cdef intp_t seg, cnt = 0
    _prepare_query(qb, v.d, v.dpad, v.gam)
    _reset_counters(qb)
    for seg in range(v.n_segs):
        cnt += _walk(v, X, qb, b, mode, v.seg_node0[seg], 0, out_ids, out_sc)
    cnt += _rel_flush(v, X, qb, b, mode, out_ids, out_sc)
    return cnt


cdef struct Task:
    # a subtree of one segment that a split single query walks
    intp_t node0       # the segment's first node
    intp_t local       # the subtree's root, local to the segment
    intp_t weight      # its live points
    int thread         # the thread that walked it,
    intp_t begin       # where its hits start in that thread's part buffers,
    intp_t count       # and how many points it reported (or counted)


cdef intp_t _add_task(const CoreView* v, const floating* X, QueryBuf* qb, double b, int mode,
                      intp_t node0, intp_t local, Task* tasks, intp_t* n_tasks,
                      vector[intp_t]* out_ids, vector[double]* out_sc) noexcept nogil:
    """Settle a node (``_settle_node``; returns the points it reported), or
    append it to ``tasks`` when it straddles the hyperplane."""
    cdef intp_t node = node0 + local
    cdef double cw
    cdef intp_t cnt = _settle_node(v, X, qb, node, b, mode, &cw, out_ids, out_sc)
    if cnt >= 0:
        return cnt
    tasks[n_tasks[0]].node0 = node0
    tasks[n_tasks[0]].local = local
    tasks[n_tasks[0]].weight = v.node_alive[node]
    n_tasks[0] += 1
    return 0


cdef inline bint _split_pays(const CoreView* v, intp_t straddling) noexcept nogil:
    """Whether splitting a query whose straddling subtrees hold this many
    live points across threads pays: the split costs about 5 us (waking
    the threads, their buffers); on this measure it broke even at about
    10k points at d = 32 and 4k at d = 128 (work ~ 2**19)."""
    return straddling * (v.d + 16) >= SPLIT_MIN_WORK


cdef intp_t _split_tasks(const CoreView* v, const floating* X, QueryBuf* qb, double b,
                         int mode, int n_threads, Task* tasks, intp_t* n_tasks,
                         intp_t* total, vector[intp_t]* out_ids,
                         vector[double]* out_sc) noexcept nogil:
    """Cut the query into straddling subtrees: start from the segment roots
    and open the heaviest internal subtree (skipping or reporting whole the
    children the bounds decide) until every subtree holds at most
    1 / (SPLIT_SHARE n_threads) of the straddling points, MAX_TASKS are
    reached, or too few points straddle for a split to pay (see
    ``_split_pays``).  Returns the count of the points reported on the
    way; ``total`` gets the straddling points."""
    cdef intp_t seg, i, j, node, cnt = 0
    cdef Task t
    n_tasks[0] = 0
    for seg in range(v.n_segs):
        cnt += _add_task(v, X, qb, b, mode, v.seg_node0[seg], 0, tasks, n_tasks,
                         out_ids, out_sc)
    while True:
        total[0] = 0
        j = -1
        for i in range(n_tasks[0]):
            total[0] += tasks[i].weight
            if (v.node_right[tasks[i].node0 + tasks[i].local] >= 0
                    and (j < 0 or tasks[i].weight > tasks[j].weight)):
                j = i
        if (j < 0 or n_tasks[0] > MAX_TASKS - 2 or not _split_pays(v, total[0])
                or tasks[j].weight * SPLIT_SHARE * n_threads <= total[0]):
            return cnt
        t = tasks[j]
        n_tasks[0] -= 1
        tasks[j] = tasks[n_tasks[0]]
        node = t.node0 + t.local
        cnt += _add_task(v, X, qb, b, mode, t.node0, t.local + 1, tasks, n_tasks,
                         out_ids, out_sc)
        cnt += _add_task(v, X, qb, b, mode, t.node0, v.node_right[node], tasks, n_tasks,
                         out_ids, out_sc)


cdef inline void _sort_tasks(Task* tasks, intp_t n, bint by_weight) noexcept nogil:
    """Insertion sort (n <= MAX_TASKS): by decreasing weight, or by node
    (slot order, as the serial walk visits them)."""
    cdef intp_t i, j
    cdef Task t
    for i in range(1, n):
        t = tasks[i]
        j = i
        while j > 0 and ((by_weight and tasks[j - 1].weight < t.weight) or
                         (not by_weight and tasks[j - 1].node0 + tasks[j - 1].local
                          > t.node0 + t.local)):
            tasks[j] = tasks[j - 1]
            j -= 1
        tasks[j] = t


cdef inline void _add_counters(QueryBuf* dst, const QueryBuf* src) noexcept nogil:
    dst.n_nodes += src.n_nodes
    dst.n_screened += src.n_screened
    dst.n_refined += src.n_refined
    dst.n_refined2 += src.n_refined2
    dst.n_verified += src.n_verified
    dst.n_bulk += src.n_bulk


cdef intp_t _query_split(const CoreView* v, const floating* X, QueryBuf* qb, double b,
                         int mode, int n_threads, vector[intp_t]* out_ids,
                         vector[double]* out_sc) noexcept nogil:
    """``_query_one`` for one large query on up to n_threads threads.

    The straddling subtrees (see ``_split_tasks``) are walked by the
    threads, heaviest first, each thread taking the next subtree when it is
    done; each subtree's walk ends with a flush of the relative-code
    pipeline, so its hits are one run in the part buffer of the thread that
    walked it.  The runs are appended to ``out_*`` in the order of the
    subtrees: the output order depends on n_threads but not on the timing
    of the threads.  Queries too small for a split to pay (see
    ``_split_pays``), and all with n_threads == 1 or no memory for the
    split, run on the calling thread alone.  qb.w must be set; qb's
    counters get the whole query's work."""
    cdef Task tasks[64]                          # MAX_TASKS
    cdef intp_t n_tasks = 0, total = 0, cnt = 0, i, k, n, next_task = 0
    cdef intp_t* next_ptr = &next_task
    cdef QueryBuf** helpers = NULL
    cdef vector[intp_t]** part_ids = NULL
    cdef vector[double]** part_sc = NULL
    cdef QueryBuf* mine
    cdef vector[intp_t]* my_ids
    cdef vector[double]* my_sc
    cdef intp_t t
    cdef int tid
    if n_threads <= 1 or v.n_segs > MAX_TASKS - 2:     # (segments: O(log n))
        return _query_one(v, X, qb, b, mode, out_ids, out_sc)
    _prepare_query(qb, v.d, v.dpad, v.gam)
    _reset_counters(qb)
    cnt = _split_tasks(v, X, qb, b, mode, n_threads, tasks, &n_tasks, &total,
                       out_ids, out_sc)
    if n_tasks > 1 and _split_pays(v, total):
        helpers = <QueryBuf**>calloc(n_threads, sizeof(QueryBuf*))
        part_ids = <vector[intp_t]**>calloc(n_threads, sizeof(void*))
        part_sc = <vector[double]**>calloc(n_threads, sizeof(void*))
    if helpers == NULL or part_ids == NULL or part_sc == NULL:
        free(helpers)
        free(part_ids)
        free(part_sc)
        _sort_tasks(tasks, n_tasks, False)
        for i in range(n_tasks):
            cnt += _walk(v, X, qb, b, mode, tasks[i].node0, tasks[i].local, out_ids, out_sc)
        return cnt + _rel_flush(v, X, qb, b, mode, out_ids, out_sc)
    _sort_tasks(tasks, n_tasks, True)
    for i in range(n_tasks):
        tasks[i].count = 0
    qb.n_tasks = n_tasks
    with parallel(num_threads=n_threads):
        tid = threadid()
        mine = qb
        if tid > 0:
            mine = _alloc_qbuf(v.d, 0)
            helpers[tid] = mine
            if mine != NULL:
                memcpy(mine.w, qb.w, v.d * sizeof(double))
                _prepare_query(mine, v.d, v.dpad, v.gam)
                _reset_counters(mine)
        if mine != NULL:
            my_ids = &sqd_thread_buffers().part_ids
            my_sc = &sqd_thread_buffers().part_scores
            part_ids[tid] = my_ids
            part_sc[tid] = my_sc
            t = sqd_next_task(next_ptr)
            while t < n_tasks:
                tasks[t].thread = tid
                tasks[t].begin = my_ids.size()
                tasks[t].count = (_walk(v, X, mine, b, mode, tasks[t].node0, tasks[t].local,
                                        my_ids, my_sc)
                                  + _rel_flush(v, X, mine, b, mode, my_ids, my_sc))
                t = sqd_next_task(next_ptr)
    n = 0
    for i in range(n_tasks):
        n += tasks[i].count
    if mode != MODE_COUNT and n > 0:
        k = out_ids.size()
        out_ids.resize(k + n)
        if mode == MODE_SCORES:
            out_sc.resize(k + n)
        for i in range(n_tasks):
            t = tasks[i].thread
            memcpy(out_ids.data() + k, part_ids[t].data() + tasks[i].begin,
                   tasks[i].count * sizeof(intp_t))
            if mode == MODE_SCORES:
                memcpy(out_sc.data() + k, part_sc[t].data() + tasks[i].begin,
                       tasks[i].count * sizeof(double))
            k += tasks[i].count
    for t in range(n_threads):
        if helpers[t] != NULL:
            _add_counters(qb, helpers[t])
            _free_qbuf(helpers[t])
        if part_ids[t] != NULL:
            part_ids[t].clear()
            part_sc[t].clear()
            if part_ids[t].capacity() > SINGLE_KEEP:    # do not hold on to a huge part
                part_ids[t].shrink_to_fit()
                part_sc[t].shrink_to_fit()
    free(helpers)
    free(part_ids)
    free(part_sc)
    return cnt + n


cdef void _search_range(const CoreView* v, const floating* X, QueryBuf* qb,
                        intp_t start, intp_t end) noexcept nogil:
    """Offer the live slots of [start, end) to the top-k heap, screening them
    against its current k-th score."""
    cdef intp_t s, s0, s1, sid, i, n_acc, n_ver, d = v.d
    s0 = start
    while s0 < end:
        s1 = s0 + CHUNK
        if s1 > end:
            s1 = end
        _chunk_dots(v, qb, s0, s1)
        s = s0
        while s < s1 and qb.hsize < qb.k:      # fill the heap
            sid = v.ids[s]
            if sid >= 0:
                _heap_push(qb, sqd_xdot(X + s * d, qb.w, d), sid)
            s += 1
        if s < s1:
            # only points whose upper bound reaches the k-th score can enter
            _classify_chunk(v, qb, s, s1 - s, qb.doff + s - s0, qb.hscore[0], &n_acc,
                            &n_ver)
            for i in range(n_ver):
                qb.pos[n_acc + i] = qb.pos[VER_OFF + i]
            sqd_prefetch_rows(<const char*>X, d * sizeof(floating), s, qb.pos,
                              n_acc + n_ver)
            for i in range(n_acc + n_ver):
                sid = v.ids[s + qb.pos[i]]
                if sid >= 0:
                    _heap_push(qb, sqd_xdot(X + (s + qb.pos[i]) * d, qb.w, d), sid)
        s0 = s1


cdef void _search_one(const CoreView* v, const floating* X, QueryBuf* qb) noexcept nogil:
    """Exact top-k by inner product into qb's heap; qb.w and qb.k must be set."""
    cdef intp_t seg, node0, n_nodes, node, local, top, c, r
    cdef intp_t pend_start = 0, pend_end = 0
    cdef intp_t d = v.d
    cdef double lo, hi, lo_l, hi_l, lo_r, hi_r
    cdef double* stack_hi = <double*>(qb.stack + MAX_DEPTH)
    _prepare_query(qb, d, v.dpad, v.gam)
    qb.hsize = 0
    if qb.k == 0:
        return
    for seg in range(v.n_segs):
        node0 = v.seg_node0[seg]
        n_nodes = v.seg_n_nodes[seg]
        if v.node_alive[node0] == 0:
            continue
        _node_bounds(v, node0, qb, &lo, &hi)
        qb.stack[0] = 0
        stack_hi[0] = hi
        top = 1
        while top > 0:
            top -= 1
            local = qb.stack[top]
            node = node0 + local
            if _heap_prunes(qb, stack_hi[top]):
                continue
            if v.node_right[node] < 0:
                # adjacent leaves are screened in one run (as in _query_one)
                if v.node_start[node] == pend_end:
                    pend_end = v.node_end[node]
                elif v.node_end[node] == pend_start:
                    pend_start = v.node_start[node]
                else:
                    if pend_end > pend_start:
                        _search_range(v, X, qb, pend_start, pend_end)
                    pend_start = v.node_start[node]
                    pend_end = v.node_end[node]
                continue
            # push the children, the more promising one last (visited first)
            c = local + 1                      # left child
            r = v.node_right[node]             # right child
            lo_l = hi_l = lo_r = hi_r = -HUGE_VAL
            if v.node_alive[node0 + c] > 0:
                _node_bounds(v, node0 + c, qb, &lo_l, &hi_l)
            if v.node_alive[node0 + r] > 0:
                _node_bounds(v, node0 + r, qb, &lo_r, &hi_r)
            if hi_l >= hi_r:   # order the pair so that the more promising child goes last
                c, r = r, c
                hi_l, hi_r = hi_r, hi_l
            if v.node_alive[node0 + c] > 0:
                qb.stack[top] = c
                stack_hi[top] = hi_l
                top += 1
            if v.node_alive[node0 + r] > 0:
                qb.stack[top] = r
                stack_hi[top] = hi_r
                top += 1
        if pend_end > pend_start:
            _search_range(v, X, qb, pend_start, pend_end)
        pend_start = pend_end = 0


cdef QueryBuf* _alloc_qbuf(intp_t d, intp_t k) noexcept nogil:
    """Allocate a per-thread query buffer (NULL on failure)."""
    cdef QueryBuf* qb = <QueryBuf*>malloc(sizeof(QueryBuf))
    if qb == NULL:
        return NULL
    qb.w = <double*>malloc((d + 1) * sizeof(double))
    qb.qw = <int8_t*>malloc((d + 8) * sizeof(int8_t))
    qb.qw2 = <int8_t*>malloc((d + 8) * sizeof(int8_t))
    qb.dots = <int32_t*>malloc((CHUNK + 16) * sizeof(int32_t))
    qb.dots2 = <int32_t*>malloc((CHUNK + 16) * sizeof(int32_t))
    qb.dots8 = <int32_t*>malloc(2 * (CHUNK + 16) * sizeof(int32_t))
    qb.pend = <intp_t*>malloc(CHUNK * sizeof(intp_t))
    qb.pend_d1 = <int32_t*>malloc(CHUNK * sizeof(int32_t))
    qb.pend_d2 = <int32_t*>malloc(CHUNK * sizeof(int32_t))
    qb.n_pend = 0
    qb.r1_slot = <intp_t*>malloc(CHUNK * sizeof(intp_t))
    qb.r2_slot = <intp_t*>malloc((CHUNK + 16) * sizeof(intp_t))
    qb.r2_f = <double*>malloc((CHUNK + 16) * sizeof(double))
    qb.r3_slot = <intp_t*>malloc((CHUNK + 16) * sizeof(intp_t))
    qb.r_acc = <int32_t*>malloc((CHUNK + 16) * sizeof(int32_t))
    qb.r1_n = qb.r2_n = qb.r3_n = 0
    qb.flag = <unsigned char*>malloc(CHUNK + 8)
    qb.pos = <int32_t*>malloc((VER_OFF + CHUNK + 16) * sizeof(int32_t))
    # the stack holds MAX_DEPTH node indices, then MAX_DEPTH doubles (search)
    qb.stack = <intp_t*>malloc(MAX_DEPTH * (sizeof(intp_t) + sizeof(double)))
    qb.hscore = <double*>malloc((k + 1) * sizeof(double))
    qb.hid = <intp_t*>malloc((k + 1) * sizeof(intp_t))
    qb.k = k
    qb.hsize = 0
    if (qb.w == NULL or qb.qw == NULL or qb.qw2 == NULL or qb.dots == NULL
            or qb.dots2 == NULL or qb.dots8 == NULL or qb.flag == NULL
            or qb.pend == NULL or qb.pend_d1 == NULL or qb.pend_d2 == NULL
            or qb.r1_slot == NULL or qb.r2_slot == NULL or qb.r2_f == NULL
            or qb.r3_slot == NULL or qb.r_acc == NULL
            or qb.pos == NULL
            or qb.stack == NULL
            or qb.hscore == NULL or qb.hid == NULL):
        _free_qbuf(qb)
        return NULL
    return qb


cdef void _free_qbuf(QueryBuf* qb) noexcept nogil:
    if qb == NULL:
        return
    free(qb.w)
    free(qb.qw)
    free(qb.qw2)
    free(qb.dots)
    free(qb.dots2)
    free(qb.dots8)
    free(qb.pend)
    free(qb.pend_d1)
    free(qb.pend_d2)
    free(qb.r1_slot)
    free(qb.r2_slot)
    free(qb.r2_f)
    free(qb.r3_slot)
    free(qb.r_acc)
    free(qb.flag)
    free(qb.pos)
    free(qb.stack)
    free(qb.hscore)
    free(qb.hid)
    free(qb)


cdef void _load_query(QueryBuf* qb, intp_t q, intp_t d, const floating* W,
                      const intp_t* indptr, const intp_t* indices) noexcept nogil:
    """Densify query q (dense row, or CSR row when indptr != NULL) into qb.w."""
    cdef intp_t j
    if indptr == NULL:
        for j in range(d):
            qb.w[j] = <double>W[q * d + j]
    else:
        for j in range(d):
            qb.w[j] = 0.0
        for j in range(indptr[q], indptr[q + 1]):
            qb.w[indices[j]] += <double>W[j]


cdef int _batch_query(const CoreView* v, const floating* X, const floating* W,
                      const intp_t* indptr, const intp_t* indices, intp_t n_queries,
                      const double* b, int mode, int n_threads, intp_t* counts,
                      vector[intp_t]* res_ids, vector[double]* res_sc) except -1 nogil:
    """Run n_queries queries across OpenMP threads; results per query.
    Fewer than 4 queries per thread run one after the other, each split
    across the threads if it is large (``_query_split``)."""
    cdef intp_t q
    cdef QueryBuf* qb
    cdef int failed = 0
    cdef int* failed_ptr = &failed      # written through a pointer: shared
    if n_queries < 4 * n_threads:
        qb = _alloc_qbuf(v.d, 0)
        if qb == NULL:
            with gil:
                raise MemoryError()
        for q in range(n_queries):
            _load_query(qb, q, v.d, W, indptr, indices)
            counts[q] = _query_split(v, X, qb, b[q], mode, n_threads, &res_ids[q], &res_sc[q])
        _free_qbuf(qb)
        return 0
    with parallel(num_threads=n_threads):
        qb = _alloc_qbuf(v.d, 0)
        if qb == NULL:
            failed_ptr[0] = 1
        else:
            for q in prange(n_queries, schedule="dynamic"):
                _load_query(qb, q, v.d, W, indptr, indices)
                counts[q] = _query_one(v, X, qb, b[q], mode, &res_ids[q], &res_sc[q])
            _free_qbuf(qb)
    if failed:
        with gil:
            raise MemoryError()
    return 0


cdef int _batch_search(const CoreView* v, const floating* X, const floating* W,
                       const intp_t* indptr, const intp_t* indices, intp_t n_queries,
                       intp_t k, int n_threads, double* out_s,
                       intp_t* out_i) except -1 nogil:
    """Exact top-k per query, sorted by decreasing score then increasing id."""
    cdef intp_t q, j, n
    cdef QueryBuf* qb
    cdef int failed = 0
    cdef int* failed_ptr = &failed      # written through a pointer: shared
    cdef double s
    cdef intp_t i
    with parallel(num_threads=n_threads):
        qb = _alloc_qbuf(v.d, k)
        if qb == NULL:
            failed_ptr[0] = 1
        else:
            for q in prange(n_queries, schedule="dynamic"):
                _load_query(qb, q, v.d, W, indptr, indices)
                _search_one(v, X, qb)
                # heap-sort out: pop the worst into the last free position
                n = qb.hsize
                for j in range(k):
                    out_s[q * k + j] = -HUGE_VAL
                    out_i[q * k + j] = -1
                while n > 0:
                    # the root is the worst kept hit: it goes last
                    s = qb.hscore[0]
                    i = qb.hid[0]
                    out_s[q * k + n - 1] = s
                    out_i[q * k + n - 1] = i
                    n = n - 1
                    _heap_drop_root(qb, n)
                qb.k = k
            _free_qbuf(qb)
    if failed:
        with gil:
            raise MemoryError()
    return 0


cdef void _heap_drop_root(QueryBuf* qb, intp_t n) noexcept nogil:
    """Drop the root of a heap of n+1 entries, leaving a valid heap of n."""
    qb.hsize = n
    qb.k = n
    if n > 0:
        _sift_down_from_root(qb.hscore, qb.hid, n, qb.hscore[n], qb.hid[n])


# ---------------------------------------------------------------------------
# tree construction

cdef inline double _dist2_to(const floating* x, const float* c, intp_t d) noexcept nogil:
    """Squared distance (4 independent sums: no dependency chain)."""
    cdef intp_t j = 0
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, t0, t1, t2, t3
    while j + 4 <= d:
        t0 = <double>x[j] - <double>c[j]
        t1 = <double>x[j + 1] - <double>c[j + 1]
        t2 = <double>x[j + 2] - <double>c[j + 2]
        t3 = <double>x[j + 3] - <double>c[j + 3]
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        j += 4
    while j < d:
        t0 = <double>x[j] - <double>c[j]
        s0 += t0 * t0
        j += 1
    return (s0 + s1) + (s2 + s3)



cdef inline double _slot_distance_bound(const CoreView* v, bint is32, intp_t s,
                                        const float* c) noexcept nogil:
    """Upper bound on the distance of slot s to the float32 centre c, with
    the same rounding cover as the radii of _node_stats."""
    cdef double dist2
    if is32:
        dist2 = _dist2_to(<const float*>v.X + s * v.d, c, v.d)
    else:
        dist2 = _dist2_to(<const double*>v.X + s * v.d, c, v.d)
    return sqrt(dist2) * INFL + v.d * TINY


cdef inline void _rel_codes(const floating* p, const float* c, intp_t d, intp_t dpad8,
                            double s4, intp_t slot, uint8_t* rhi, uint8_t* rlo, uint8_t* r3,
                            double* out) noexcept nogil:
    """Leaf-relative codes of one point p with leaf centre c and scale s4
    (written into both nibble planes, and into the third-level row at
    ``slot`` unless r3 is NULL); out = its A0, C0, A1, C1, A2, C2.

    All three levels come from one rounding at the finest scale s12 =
    s4 / 256: q12 = round((p - c) / s12) (clipped to +-1911), q8 =
    floor((q12 + 8) / 16), q_3 = q12 - 16 q8 in [-8, 7], q_hi =
    floor((q8 + 8) / 16) and q_lo = q8 - 16 q_hi in [-8, 7] (q_hi in [-7, 7]
    while |q12| <= 1911).  With s8 = s4 / 16 and r = p - c, the residuals
    e0 = r - s4 q_hi, e1 = r - s8 q8 and e2 = r - s12 q12 are at most
    0.54 s4, 0.54 s8 and s12 / 2 per feature (rounding each level on its
    own would clip q_lo, or q_3, at +8 for one feature in 32 and
    double their residual), and |e_k| <= 1.15 |r| (a nonzero code needs
    |r| >= 7.5 units of the next finer level).  Each residual is computed
    from r directly, so it errs by at most u (|e_k| + |r|) plus the error
    of r, u |r|: 6 u ||r|| covers the error of every norm.  The codes and
    the sums of squares come from sqd_rel_codes (eight partial sums per
    norm; any summation order is covered by INFL): AVX2 intrinsics for
    float32 points where the CPU has AVX2, else generic code, with
    bit-identical results (tested).
    """
    cdef double sums[7]
    cdef double s8 = s4 / 16.0, s12 = s4 / 256.0
    cdef double qh2, q82, q122, n0, n1, n2, nr
    sqd_rel_codes(p, c, d, dpad8, s4, slot, rhi, rlo, r3, sums)
    qh2, q82, q122, n0, n1, n2, nr = sums[0], sums[1], sums[2], sums[3], sums[4], sums[5], sums[6]
    out[0] = s4 * sqrt(qh2) * INFL
    out[1] = sqrt(n0) * INFL + 6.0 * U64 * sqrt(nr) + d * TINY
    out[2] = s8 * sqrt(q82) * INFL
    out[3] = sqrt(n1) * INFL + 6.0 * U64 * sqrt(nr) + d * TINY
    out[4] = s12 * sqrt(q122) * INFL
    out[5] = sqrt(n2) * INFL + 6.0 * U64 * sqrt(nr) + d * TINY


cdef float _leaf_rel_scale(const floating* X, const intp_t* ids, const float* ec, intp_t d,
                           intp_t start, intp_t end, const float* c) noexcept nogil:
    """The scale s4 of a leaf's relative codes (max |p_j - c_j| / 7 over its
    live slots), or 0 if a quick estimate says they would not pay (see
    _encode_leaf_rel)."""
    cdef intp_t n_live = 0
    cdef double sum_ec = 0.0
    cdef double maxabs = sqd_range_maxdiff(X, d, ids, ec, start, end, c, &n_live, &sum_ec)
    cdef float s4f = <float>(maxabs / 7.0)
    # s4 / 256 must stay a normal float32; huge scales are not worth it
    if n_live == 0 or d > MAX_SCREEN_D or not (s4f >= 256.0 * FLT_MIN and s4f < 1e30):
        return 0.0
    # A typical ||e1|| is (s4 / 16) sqrt(d / 12) (rounding errors uniform
    # in half a step), and C1 is a maximum: if that alone fails the gain
    # test, skip the encoding (Gaussian-like leaves, most of the time).
    if (s4f / 16.0) * sqrt(d / 12.0) > REL_GAIN * sum_ec / n_live:
        return 0.0
    return s4f


cdef void _encode_leaf_rel(const floating* X, const intp_t* ids, const float* ec, intp_t d,
                           intp_t dpad8, intp_t start, intp_t end, const float* c,
                           float s4f, uint8_t* rhi, uint8_t* rlo, uint8_t* r3,
                           float* rel) noexcept nogil:
    """Leaf-relative codes, at scale s4f (from _leaf_rel_scale), of the live
    slots of a leaf and its constants rel = (s4, A0, C0, A1, C1, A2, C2)
    (maxima over the live slots, rounded up); s4 = 0 (codes unused) unless
    they beat the absolute codes clearly: C1 <= REL_GAIN * mean(c_p)."""
    cdef intp_t s, j, n_live = 0
    cdef double sum_ec = 0.0, s4 = <double>s4f
    cdef double m[6]
    cdef double out[6]
    rel[0] = 0.0
    for j in range(6):
        m[j] = 0.0
    for s in range(start, end):
        if ids[s] < 0:
            continue
        n_live += 1
        sum_ec += ec[s]
        _rel_codes(X + s * d, c, d, dpad8, s4, s, rhi, rlo, r3, out)
        for j in range(6):
            if out[j] > m[j]:
                m[j] = out[j]
    for j in range(6):
        rel[j + 1] = _round_up_f32(m[j])
    if n_live > 0 and m[3] <= REL_GAIN * sum_ec / n_live:
        rel[0] = s4f


cdef void _node_stats(const floating* X, const intp_t* ids, intp_t d, intp_t start,
                      intp_t end, bint refine, float* center, double* radius,
                      double* cnorm, intp_t* alive, double* buf) noexcept nogil:
    """Centre (float32) of the leaf [start, end) and an upper bound on the
    distance of every slot to it; any centre is valid, since the radius is
    measured from the stored one.  The centre is the centroid; if ``refine``,
    a Badoiu-Clarkson refinement of it when that gives a smaller radius.
    ``buf`` holds 2 d + 2 (end - start) doubles when refining, else d.
    (Internal nodes get theirs from the builder's passes.)"""
    cdef intp_t s, j, n = end - start, n_alive = 0
    cdef double r2 = 0.0, r2b = 0.0, c2 = 0.0
    cdef double* dist = buf + d
    cdef float* cand = <float*>(buf + d + n)
    cdef intp_t* order = <intp_t*>(buf + 2 * d + n)
    for s in range(start, end):
        if ids[s] >= 0:
            n_alive += 1
    sqd_range_sum(X, d, start, end, buf)
    for j in range(d):
        center[j] = <float>(buf[j] / n) if n > 0 else 0.0
    refine = refine and n > 2
    r2 = sqd_range_dist2(X, d, start, end, center, dist if refine else NULL)
    if refine:
        for j in range(d):
            buf[j] = <double>center[j]
        sqd_refine_center(X, d, start, n, dist, order, buf)
        for j in range(d):
            cand[j] = <float>buf[j]
        r2b = sqd_range_dist2(X, d, start, end, cand, NULL)
        if r2b < r2:
            r2 = r2b
            for j in range(d):
                center[j] = cand[j]
    for j in range(d):
        c2 += <double>center[j] * <double>center[j]
    radius[0] = sqrt(r2) * INFL + d * TINY
    cnorm[0] = sqrt(c2) * INFL
    alive[0] = n_alive


_ISA_NAMES = ("portable", "avx2", "avx512-vnni")


def screening_kernel():
    """Name of the integer screening kernel in use on this CPU."""
    return _ISA_NAMES[sqd_isa()]


def _cap_screening_kernel(int level):
    """Cap the kernel level (0 portable, 1 AVX2, 2 VNNI); returns the old cap.

    For tests only: not thread-safe, and must not change while queries run.
    """
    global sqd_isa_cap
    old = sqd_isa_cap
    sqd_isa_cap = level
    return old


def _set_stage0_skip_spreads(double spreads):
    """Set the distance from b, in spreads beyond the stage-0 band, within
    which a relative leaf skips stage 0 (``-inf``: never; ``inf``: every leaf
    of positive radius); returns the old value.

    For tests (both paths give the same answers) and calibration only: not
    thread-safe, and must not change while queries run.
    """
    global STAGE0_SKIP_SPREADS
    old = STAGE0_SKIP_SPREADS
    STAGE0_SKIP_SPREADS = spreads
    return old


def _set_split_min_work(intp_t n):
    """Set the work (straddling points times d + 16) from which a single
    query is split across threads; returns the old value.

    For tests (to split queries on small indexes) and calibration only:
    not thread-safe, and must not change while queries run.
    """
    global SPLIT_MIN_WORK
    old = SPLIT_MIN_WORK
    SPLIT_MIN_WORK = max(n, 0)
    return old


def _grow(old, intp_t new_cap, intp_t used):
    """A larger copy of a capacity array, keeping its first ``used`` rows."""
    new = np.empty((new_cap,) + old.shape[1:], dtype=old.dtype)
    new[:used] = old[:used]
    return new


cdef class _HalfspaceCore:
    """Storage, segments and trees of a HalfspaceIndex (one dtype per instance)."""

    cdef readonly intp_t d
    cdef readonly intp_t dpad
    cdef readonly intp_t dpad8
    cdef readonly intp_t leaf_size
    cdef readonly object dtype
    cdef readonly intp_t n_slots
    cdef readonly intp_t n_alive
    cdef readonly intp_t next_id
    cdef readonly intp_t n_rebuilds
    # rows added and query rows, halved at every segment build (merge rule)
    cdef readonly intp_t recent_adds
    cdef readonly intp_t recent_query_rows
    cdef bint is32
    cdef readonly intp_t r3w   # bytes per third-level row (0: no stage 2)
    cdef readonly bint rel_planes   # the relative-code planes are allocated
    cdef double gam
    # slot arrays (capacity rows)
    cdef object _X
    cdef object _codes
    cdef object _scale
    cdef object _ea
    cdef object _ec
    cdef object _rows2
    cdef object _rhi
    cdef object _rlo
    cdef object _r3
    cdef object _ids
    # node arrays (capacity nodes)
    cdef object _node_start
    cdef object _node_end
    cdef object _node_right
    cdef object _node_alive
    cdef object _node_center
    cdef object _node_radius
    cdef object _node_cnorm
    cdef object _node_rel
    cdef intp_t n_nodes_used
    cdef vector[intp_t] seg_start
    cdef vector[intp_t] seg_end
    cdef vector[intp_t] seg_node0
    cdef vector[intp_t] seg_n_nodes
    cdef vector[intp_t] seg_stale
    cdef unordered_map[intp_t, intp_t] id2slot

    def __init__(self, intp_t d, intp_t leaf_size, dtype):
        self.d = d
        self.dpad = (d + 3) // 4 * 4
        self.dpad8 = (d + 7) // 8 * 8
        self.leaf_size = leaf_size
        self.dtype = np.dtype(dtype)
        self.is32 = self.dtype == np.float32
        # Stage 2 replaces most exact verifications, each a row of X, by one
        # read of a d / 2-byte row; it pays once a row of X spans 8 cache
        # lines (measured: 3-7% slower at 2 and 4 lines, 6-10% faster at 8).
        self.r3w = self.dpad8 // 2 if d * self.dtype.itemsize >= STAGE2_MIN_ROW else 0
        self.gam = 16.0 * (d + 8) * U64
        self.n_slots = 0
        self.n_alive = 0
        self.next_id = 0
        self.n_rebuilds = 0
        self.n_nodes_used = 0
        self._X = np.empty((0, d), dtype=self.dtype)
        self._codes = np.empty(0, dtype=np.uint8)
        self._scale = np.empty(0, dtype=np.float32)
        self._ea = np.empty(0, dtype=np.float32)
        self._ec = np.empty(0, dtype=np.float32)
        self._rows2 = np.empty((0, self.dpad + 8), dtype=np.uint8)
        # allocated when a build first finds a leaf that qualifies
        self._rhi = np.empty(0, dtype=np.uint8)
        self._rlo = np.empty(0, dtype=np.uint8)
        self._r3 = np.empty(0, dtype=np.uint8)
        self.rel_planes = False
        self._ids = np.empty(0, dtype=np.intp)
        self._node_start = np.empty(0, dtype=np.intp)
        self._node_end = np.empty(0, dtype=np.intp)
        self._node_right = np.empty(0, dtype=np.intp)
        self._node_alive = np.empty(0, dtype=np.intp)
        self._node_center = np.empty((0, d), dtype=np.float32)
        self._node_radius = np.empty(0, dtype=np.float64)
        self._node_cnorm = np.empty(0, dtype=np.float64)
        self._node_rel = np.empty((0, REL_W), dtype=np.float32)

    # -- bookkeeping --------------------------------------------------------

    cdef CoreView _view(self):
        cdef CoreView v
        v.X = cnp.PyArray_DATA(<cnp.ndarray>self._X)
        v.codes = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>self._codes)
        v.scale = <const float*>cnp.PyArray_DATA(<cnp.ndarray>self._scale)
        v.ea = <const float*>cnp.PyArray_DATA(<cnp.ndarray>self._ea)
        v.ec = <const float*>cnp.PyArray_DATA(<cnp.ndarray>self._ec)
        v.rows2 = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>self._rows2)
        v.ids = <const intp_t*>cnp.PyArray_DATA(<cnp.ndarray>self._ids)
        v.node_start = <const intp_t*>cnp.PyArray_DATA(<cnp.ndarray>self._node_start)
        v.node_end = <const intp_t*>cnp.PyArray_DATA(<cnp.ndarray>self._node_end)
        v.node_right = <const intp_t*>cnp.PyArray_DATA(<cnp.ndarray>self._node_right)
        v.node_alive = <const intp_t*>cnp.PyArray_DATA(<cnp.ndarray>self._node_alive)
        v.node_center = <const float*>cnp.PyArray_DATA(<cnp.ndarray>self._node_center)
        v.node_radius = <const double*>cnp.PyArray_DATA(<cnp.ndarray>self._node_radius)
        v.node_cnorm = <const double*>cnp.PyArray_DATA(<cnp.ndarray>self._node_cnorm)
        v.rhi = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>self._rhi)
        v.rlo = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>self._rlo)
        v.r3 = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>self._r3) if self.r3w else NULL
        v.node_rel = <const float*>cnp.PyArray_DATA(<cnp.ndarray>self._node_rel)
        v.seg_node0 = self.seg_node0.data()
        v.seg_n_nodes = self.seg_n_nodes.data()
        v.n_segs = <intp_t>self.seg_start.size()
        v.d = self.d
        v.dpad = self.dpad
        v.stride2 = self.dpad + 8
        v.dpad8 = self.dpad8
        v.r3w = self.r3w
        v.gam = self.gam
        return v

    cdef _reserve_slots(self, intp_t n):
        cdef intp_t cap = self._ids.shape[0], new_cap, used = self.n_slots
        if n <= cap:
            return
        # Double the capacity into fresh arrays.  The fresh arrays come
        # zeroed from the system (calloc: pages are mapped and zeroed only
        # when first touched), are advised onto huge pages before anything
        # touches them, and receive a copy of the used rows; the unused
        # capacity costs address space, not memory.  Growing in place by
        # 1/16 (realloc) was tried: on huge-page-backed arrays the kernel's
        # remapping splits the huge pages, so each step cost 60-90 ms at
        # N = 200k, d = 128 (about 5 us per single add, amortised over a
        # doubling), against one copy of the used rows per doubling here
        # (O(d) amortised per add, and one pause of about a copy of the
        # index every time the size doubles).
        new_cap = (max(n, 2 * cap, 1024) + 15) // 16 * 16
        self._X = self._fresh_slots(self._X, (new_cap, self.d), used)
        # codes come in blocks of 16 slots: copy whole blocks
        self._codes = self._fresh_slots(self._codes, (new_cap * self.dpad,),
                                        (used + 15) // 16 * 16 * self.dpad)
        self._scale = self._fresh_slots(self._scale, (new_cap,), used)
        self._ea = self._fresh_slots(self._ea, (new_cap,), used)
        self._ec = self._fresh_slots(self._ec, (new_cap,), used)
        self._rows2 = self._fresh_slots(self._rows2, (new_cap, self.dpad + 8), used)
        if self.rel_planes:
            self._fresh_rel_planes(new_cap, used)
        self._ids = self._fresh_slots(self._ids, (new_cap,), used)

    cdef _fresh_slots(self, old, shape, intp_t used):
        """Zeroed array of the given shape holding the first ``used`` rows of
        old.  np.zeros takes fresh zero pages from the system for large
        arrays, so only the copied rows are touched here."""
        new = np.zeros(shape, dtype=old.dtype)
        sqd_advise_hugepages(cnp.PyArray_DATA(<cnp.ndarray>new), new.nbytes)
        new[:used] = old[:used]
        return new

    cdef _reserve_nodes(self, intp_t n):
        cdef intp_t cap = self._node_start.shape[0], new_cap, used = self.n_nodes_used
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 16)
        self._node_start = _grow(self._node_start, new_cap, used)
        self._node_end = _grow(self._node_end, new_cap, used)
        self._node_right = _grow(self._node_right, new_cap, used)
        self._node_alive = _grow(self._node_alive, new_cap, used)
        self._node_center = _grow(self._node_center, new_cap, used)
        self._node_radius = _grow(self._node_radius, new_cap, used)
        self._node_cnorm = _grow(self._node_cnorm, new_cap, used)
        self._node_rel = _grow(self._node_rel, new_cap, used)

    def has_ids(self, const intp_t[::1] ids):
        """Boolean mask: which ids are live."""
        out = np.empty(ids.shape[0], dtype=bool)
        cdef unsigned char[::1] o = out.view(np.uint8)
        cdef intp_t i
        for i in range(ids.shape[0]):
            o[i] = self.id2slot.count(ids[i]) > 0
        return out

    def first_missing(self, const intp_t[::1] ids):
        """Position of the first id that is not live, or -1."""
        cdef intp_t i
        for i in range(ids.shape[0]):
            if self.id2slot.count(ids[i]) == 0:
                return i
        return -1

    def first_present(self, const intp_t[::1] ids):
        """Position of the first id that is live, or -1."""
        cdef intp_t i
        for i in range(ids.shape[0]):
            if self.id2slot.count(ids[i]) > 0:
                return i
        return -1

    def slots_of(self, const intp_t[::1] ids):
        """Slots of live ids (the caller checked they are live)."""
        out = np.empty(ids.shape[0], dtype=np.intp)
        cdef intp_t[::1] o = out
        cdef intp_t i
        for i in range(ids.shape[0]):
            o[i] = self.id2slot[ids[i]]
        return out

    def get(self, const intp_t[::1] ids):
        """Rows of live ids (checked by the caller), as a new array."""
        return self._X[self.slots_of(ids)]

    def live_ids(self):
        """Live ids in slot order."""
        ids = self._ids[:self.n_slots]
        return ids[ids >= 0].copy()

    def live_points(self):
        """Live rows in slot order (a copy)."""
        ids = self._ids[:self.n_slots]
        return self._X[:self.n_slots][ids >= 0].copy()

    def live_max_abs(self):
        """Largest |entry| of the live points (0.0 if none), without a copy."""
        cdef CoreView v = self._view()
        cdef intp_t s, j, n = self.n_slots, d = self.d
        cdef double m = 0.0, a
        cdef bint is32 = self.is32
        with nogil:
            for s in range(n):
                if v.ids[s] < 0:
                    continue
                for j in range(d):
                    if is32:
                        a = fabs(<double>(<const float*>v.X)[s * d + j])
                    else:
                        a = fabs((<const double*>v.X)[s * d + j])
                    if a > m:
                        m = a
        return m

    def set_next_id(self, intp_t next_id):
        self.next_id = max(self.next_id, next_id)

    @property
    def n_segments(self):
        return <intp_t>self.seg_start.size()

    @property
    def segment_sizes(self):
        return [self.seg_end[k] - self.seg_start[k] for k in range(self.seg_start.size())]

    # -- building -----------------------------------------------------------

    cdef _encode_range(self, intp_t start, intp_t end):
        """(Re)compute the codes and error constants of slots [start, end).

        Large ranges are encoded in parallel, one block of 16 slots (which
        share their code lines) per iteration; the result does not depend on
        the thread count.
        """
        cdef CoreView v = self._view()
        cdef intp_t blk, s0, s1
        cdef intp_t b0 = start >> 4, b1 = (end + 15) >> 4
        cdef int n_threads = 1 if end - start < 8192 else omp_get_max_threads()
        if end <= start:
            return
        if n_threads == 1:    # small adds and updates: no thread team
            with nogil:
                self._encode_slots(&v, start, end)
            return
        with nogil, parallel(num_threads=n_threads):
            for blk in prange(b0, b1, schedule="static"):
                s0 = blk * 16
                s1 = s0 + 16
                if s0 < start:
                    s0 = start
                if s1 > end:
                    s1 = end
                self._encode_slots(&v, s0, s1)

    cdef void _encode_slots(self, const CoreView* v, intp_t start, intp_t end) noexcept nogil:
        """Codes and error constants of slots [start, end) (one thread)."""
        cdef intp_t s, d = self.d, dpad = self.dpad
        for s in range(start, end):
            if self.is32:
                _encode_point(<const float*>v.X + s * d, d, dpad, <uint8_t*>v.codes, s,
                              <float*>v.scale + s, <float*>v.ea + s, <float*>v.ec + s,
                              <uint8_t*>v.rows2 + s * v.stride2)
            else:
                _encode_point(<const double*>v.X + s * d, d, dpad, <uint8_t*>v.codes, s,
                              <float*>v.scale + s, <float*>v.ea + s, <float*>v.ec + s,
                              <uint8_t*>v.rows2 + s * v.stride2)
            if v.ids[s] < 0:
                (<float*>v.ea)[s] = NAN    # tombstones always go to "verify"

    cdef _permute_codes(self, intp_t start, intp_t end, const intp_t[::1] perm):
        """Level-1 codes: slot ``start + i`` gets the codes of slot ``perm[i]``."""
        cdef intp_t dpad = self.dpad, b0 = start >> 4, i, g, src, dst
        cdef intp_t b1 = (end + 15) >> 4
        cdef uint8_t[::1] codes = self._codes
        # a copy of the blocks the range overlaps (sources lie in the range)
        old_arr = np.array(self._codes[b0 * 16 * dpad:b1 * 16 * dpad])
        cdef const uint8_t[::1] old = old_arr
        cdef intp_t base0 = b0 * 16 * dpad
        with nogil:
            for i in range(end - start):
                src = perm[i]
                dst = start + i
                for g in range(dpad >> 2):
                    memcpy(&codes[(dst >> 4) * 16 * dpad + 64 * g + 4 * (dst & 15)],
                           &old[(src >> 4) * 16 * dpad + 64 * g + 4 * (src & 15) - base0], 4)

    cdef _compact_from(self, intp_t start):
        """Move the live slots of [start, n_slots) down over the tombstones."""
        cdef intp_t s
        cdef intp_t[::1] ids
        cdef intp_t n = self.n_slots
        keep = np.flatnonzero(self._ids[start:n] >= 0) + start
        if keep.shape[0] == n - start:
            return
        m = keep.shape[0]
        self._X[start:start + m] = self._X[keep]
        self._ids[start:start + m] = self._ids[keep]
        ids = self._ids
        for s in range(start, start + m):
            self.id2slot[ids[s]] = s
        self.n_slots = start + m
        self._encode_range(start, start + m)

    cdef _build_segment(self, intp_t k):
        """(Re)build segment k's tree and permute its slots into tree order."""
        cdef intp_t start = self.seg_start[k], end = self.seg_end[k]
        cdef intp_t n = end - start, n_nodes, node0 = self.seg_node0[k]
        cdef intp_t d = self.d, i, s
        cdef int n_threads
        cdef int alloc_failed = 0
        cdef int* alloc_failed_ptr = &alloc_failed
        perm = np.arange(n, dtype=np.intp)
        cdef intp_t[::1] p = perm
        cdef SqdNodes nodes
        cdef CoreView v = self._view()
        cdef int build_threads = 1 if n < 16384 else omp_get_max_threads()
        # The first segment (every build of a whole index) and large ones get
        # the Lloyd splits and the leaf-centre refinement; the small tail
        # segments that single adds rebuild over and over skip both (together
        # they doubled the amortised cost of an add at d = 128).
        cdef bint refined = k == 0 or n >= 16384
        with nogil:
            if self.is32:
                sqd_build_tree(<const float*>v.X + start * d, d, &p[0], n, self.leaf_size,
                               nodes, build_threads, refined)
            else:
                sqd_build_tree(<const double*>v.X + start * d, d, &p[0], n, self.leaf_size,
                               nodes, build_threads, refined)
        n_nodes = <intp_t>nodes.starts.size()
        # only the last segment is ever (re)built, so its nodes may grow
        self._reserve_nodes(node0 + n_nodes)
        # The codes and constants of a slot depend only on its point: move
        # them with it (d / 4 four-byte moves per slot instead of encoding).
        # Each row moves once, along the permutation's cycles, in place (a
        # gather into fresh arrays and a copy back moved every row twice
        # and page-faulted the temporaries).
        cdef char* bases[6]
        cdef size_t row_bytes[6]
        bases[0] = <char*>cnp.PyArray_DATA(<cnp.ndarray>self._X)
        row_bytes[0] = d * (4 if self.is32 else 8)
        bases[1] = <char*>cnp.PyArray_DATA(<cnp.ndarray>self._ids)
        row_bytes[1] = sizeof(intp_t)
        bases[2] = <char*>cnp.PyArray_DATA(<cnp.ndarray>self._scale)
        bases[3] = <char*>cnp.PyArray_DATA(<cnp.ndarray>self._ea)
        bases[4] = <char*>cnp.PyArray_DATA(<cnp.ndarray>self._ec)
        row_bytes[2] = row_bytes[3] = row_bytes[4] = sizeof(float)
        bases[5] = <char*>cnp.PyArray_DATA(<cnp.ndarray>self._rows2)
        row_bytes[5] = self.dpad + 8
        with nogil:
            sqd_permute_rows(bases, row_bytes, 6, start, &p[0], n)
        perm += start
        self._permute_codes(start, end, perm)
        cdef intp_t[::1] ids = self._ids
        for s in range(start, end):
            if ids[s] >= 0:
                self.id2slot[ids[s]] = s
        cdef intp_t[::1] ns = self._node_start
        cdef intp_t[::1] ne = self._node_end
        cdef intp_t[::1] na = self._node_alive
        cdef float[:, ::1] nc = self._node_center
        cdef double[::1] nr = self._node_radius
        cdef double[::1] nn = self._node_cnorm
        cdef intp_t[::1] nright = self._node_right
        cdef intp_t j, r
        cdef double c2
        for i in range(n_nodes):
            ns[node0 + i] = start + nodes.starts[i]
            ne[node0 + i] = start + nodes.ends[i]
            r = nodes.rights[i]
            nright[node0 + i] = r
            if r >= 0:
                # internal node: the builder's centroid and the largest
                # squared distance of its points to it (see SqdBuilder)
                c2 = 0.0
                for j in range(d):
                    nc[node0 + i, j] = nodes.centers[i * d + j]
                    c2 += <double>nc[node0 + i, j] * <double>nc[node0 + i, j]
                nr[node0 + i] = sqrt(nodes.r2s[i]) * INFL + d * TINY
                nn[node0 + i] = sqrt(c2) * INFL
        v = self._view()
        n_threads = 1 if n < 8192 else omp_get_max_threads()
        cdef double* buf
        cdef bint refine
        # leaves of at most leaf_cap points get a refined centre (scratch:
        # 2 d + 2 leaf_cap doubles per thread), in refined segments only
        cdef intp_t leaf_cap = min(self.leaf_size, 4096) if refined else 0
        with nogil, parallel(num_threads=n_threads):
            buf = <double*>malloc((2 * d + 2 * leaf_cap) * sizeof(double))
            if buf != NULL:
                for i in prange(n_nodes, schedule="dynamic"):
                    if nright[node0 + i] >= 0:
                        continue
                    refine = ne[node0 + i] - ns[node0 + i] <= leaf_cap
                    if self.is32:
                        _node_stats(<const float*>v.X, v.ids, d, ns[node0 + i],
                                    ne[node0 + i], refine, &nc[node0 + i, 0],
                                    &nr[node0 + i], &nn[node0 + i], &na[node0 + i], buf)
                    else:
                        _node_stats(<const double*>v.X, v.ids, d, ns[node0 + i],
                                    ne[node0 + i], refine, &nc[node0 + i, 0],
                                    &nr[node0 + i], &nn[node0 + i], &na[node0 + i], buf)
                free(buf)
            else:
                alloc_failed_ptr[0] = 1
        if alloc_failed:
            raise MemoryError()
        for i in range(n_nodes - 1, -1, -1):     # live counts, bottom-up
            if nright[node0 + i] >= 0:
                na[node0 + i] = na[node0 + i + 1] + na[node0 + nright[node0 + i]]
        self._encode_leaves_rel(node0, n_nodes, refined)
        self.seg_n_nodes[k] = n_nodes
        self.seg_stale[k] = 0
        self.n_nodes_used = self.seg_node0.back() + self.seg_n_nodes.back()
        self.n_rebuilds += 1

    cdef _encode_leaves_rel(self, intp_t node0, intp_t n_nodes, bint refined):
        """Leaf-relative codes of the leaves among nodes node0.. (refined
        segments only: the small tail segments that single adds rebuild
        over and over use the absolute codes alone).  The planes are
        allocated when the first leaf qualifies."""
        cdef CoreView v = self._view()
        cdef float* rel = <float*>v.node_rel
        cdef intp_t i, node
        cdef int n_threads = 1 if n_nodes < 256 else omp_get_max_threads()
        cdef float[::1] scales
        cdef bint any_leaf = False
        # scale 0 (codes unused); the other constants zeroed too, so that
        # tree_arrays() shows no leftovers of earlier trees
        memset(rel + REL_W * node0, 0, n_nodes * REL_W * sizeof(float))
        if not refined:
            return
        scales = np.zeros(n_nodes, dtype=np.float32)
        with nogil, parallel(num_threads=n_threads):
            for i in prange(n_nodes, schedule="dynamic"):
                node = node0 + i
                if v.node_right[node] >= 0:
                    continue
                if self.is32:
                    scales[i] = _leaf_rel_scale(<const float*>v.X, v.ids, v.ec, v.d,
                                                v.node_start[node], v.node_end[node],
                                                v.node_center + node * v.d)
                else:
                    scales[i] = _leaf_rel_scale(<const double*>v.X, v.ids, v.ec, v.d,
                                                v.node_start[node], v.node_end[node],
                                                v.node_center + node * v.d)
        for i in range(n_nodes):
            any_leaf = any_leaf or scales[i] > 0.0
        if not any_leaf:
            return
        if not self.rel_planes:
            # allocated now for the current slot capacity; from then on
            # they grow with the slots
            self._fresh_rel_planes(self._ids.shape[0], 0)
            self.rel_planes = True
            v = self._view()
        with nogil, parallel(num_threads=n_threads):
            for i in prange(n_nodes, schedule="dynamic"):
                node = node0 + i
                if scales[i] == 0.0:
                    continue
                if self.is32:
                    _encode_leaf_rel(<const float*>v.X, v.ids, v.ec, v.d, v.dpad8,
                                     v.node_start[node], v.node_end[node],
                                     v.node_center + node * v.d, scales[i], <uint8_t*>v.rhi,
                                     <uint8_t*>v.rlo, <uint8_t*>v.r3, rel + REL_W * node)
                else:
                    _encode_leaf_rel(<const double*>v.X, v.ids, v.ec, v.d, v.dpad8,
                                     v.node_start[node], v.node_end[node],
                                     v.node_center + node * v.d, scales[i], <uint8_t*>v.rhi,
                                     <uint8_t*>v.rlo, <uint8_t*>v.r3, rel + REL_W * node)

    cdef _fresh_rel_planes(self, intp_t cap, intp_t used):
        """Fresh relative-code planes and third-level rows for ``cap`` slots,
        holding those of the first ``used`` slots (the planes in whole
        blocks of 16 slots)."""
        cdef intp_t plane_used = (used + 15) // 16 * 8 * self.dpad8
        self._rhi = self._fresh_slots(self._rhi, (cap * self.dpad8 // 2,), plane_used)
        self._rlo = self._fresh_slots(self._rlo, (cap * self.dpad8 // 2,), plane_used)
        self._r3 = self._fresh_slots(self._r3, (cap * self.r3w,), used * self.r3w)

    cdef _push_segment(self, intp_t start, intp_t end):
        cdef intp_t node0 = 0
        if self.seg_start.size() > 0:
            node0 = self.seg_node0.back() + self.seg_n_nodes.back()
        self.seg_start.push_back(start)
        self.seg_end.push_back(end)
        self.seg_node0.push_back(node0)
        self.seg_n_nodes.push_back(0)
        self.seg_stale.push_back(0)
        self.recent_adds //= 2
        self.recent_query_rows //= 2
        self._build_segment(<intp_t>self.seg_start.size() - 1)

    cdef _pop_segment(self):
        self.seg_start.pop_back()
        self.seg_end.pop_back()
        self.seg_node0.pop_back()
        self.seg_n_nodes.pop_back()
        self.seg_stale.pop_back()

    cdef _rebuild_tail(self, intp_t first_seg):
        """Merge segments first_seg.. into one, dropping their tombstones."""
        cdef intp_t start = self.seg_start[first_seg]
        while <intp_t>self.seg_start.size() > first_seg:
            self._pop_segment()
        self.n_nodes_used = 0 if first_seg == 0 else (
            self.seg_node0.back() + self.seg_n_nodes.back())
        self._compact_from(start)
        if self.n_slots > start:
            self._push_segment(start, self.n_slots)

    def rebuild(self):
        """Compact all tombstones and rebuild a single tree."""
        if self.seg_start.size() == 0:
            self.n_slots = 0
            return
        self._rebuild_tail(0)

    cdef bint _merge_lazily(self):
        """Whether the tail merges under the lazy rule: while the rows added
        outnumber the query rows LAZY_ADDS_PER_QUERY to one, both counted
        with their weight halved at every segment build (see "Updates and
        amortised costs")."""
        return self.recent_adds >= LAZY_ADDS_PER_QUERY * self.recent_query_rows

    cdef intp_t _lazy_merge_from(self, intp_t pending):
        """The first segment to merge with all later ones and ``pending`` new
        slots under the lazy rule: the smallest k with ``(LAZY_ARITY - 1) *
        size(k) <= pending + the sizes of the segments after k`` (the number
        of segments if there is none)."""
        cdef intp_t n = <intp_t>self.seg_start.size(), k, size, first = n
        cdef intp_t later = pending
        for k in range(n - 1, -1, -1):
            size = self.seg_end[k] - self.seg_start[k]
            if (LAZY_ARITY - 1) * size <= later:
                first = k
            later += size
        return first

    cdef _merge_tail(self, bint lazily):
        cdef intp_t k
        if lazily:
            k = self._lazy_merge_from(0)
            if k < <intp_t>self.seg_start.size():
                self._rebuild_tail(k)
            return
        while self.seg_start.size() >= 2:
            k = <intp_t>self.seg_start.size()
            if (self.seg_end[k - 2] - self.seg_start[k - 2]
                    < 2 * (self.seg_end[k - 1] - self.seg_start[k - 1])):
                self._rebuild_tail(k - 2)
            else:
                break

    # -- mutation -----------------------------------------------------------

    def add(self, cnp.ndarray X not None, cnp.ndarray ids):
        """Append rows X (validated: the core's dtype, C order) with new,
        distinct ids (an intp array checked by the caller), or with ids
        next_id, next_id + 1, ... if ids is None (the caller checked they
        fit in intp).  Returns the ids array (a new one if ids is None).

        Rows and ids are copied through raw pointers: for a single add,
        numpy slice assignments and typed memoryviews cost more than
        encoding the point."""
        cdef intp_t m = X.shape[0], start = self.n_slots, i, s
        cdef intp_t* new_ids
        if (X.ndim != 2 or X.shape[1] != self.d or not cnp.PyArray_IS_C_CONTIGUOUS(X)
                or cnp.PyArray_TYPE(X) != (cnp.NPY_FLOAT32 if self.is32 else cnp.NPY_FLOAT64)):
            raise TypeError("core.add needs a C-contiguous (m, d) array of the core's dtype")
        if ids is not None and (cnp.PyArray_TYPE(ids) != cnp.NPY_INTP
                                or not cnp.PyArray_IS_C_CONTIGUOUS(ids)
                                or ids.ndim != 1 or ids.shape[0] != m):
            raise TypeError("core.add needs ids as a contiguous intp array, one per row")
        if m == 0:
            return np.empty(0, dtype=np.intp) if ids is None else ids
        if ids is None:
            ids = np.empty(m, dtype=np.intp)
            new_ids = <intp_t*>cnp.PyArray_DATA(ids)
            for i in range(m):
                new_ids[i] = self.next_id + i
        else:
            new_ids = <intp_t*>cnp.PyArray_DATA(ids)
        self._reserve_slots(start + m)
        cdef CoreView v = self._view()
        cdef size_t row = self.d * (4 if self.is32 else 8)
        memcpy(<char*>v.X + start * row, cnp.PyArray_DATA(X), m * row)
        memcpy(<intp_t*>v.ids + start, new_ids, m * sizeof(intp_t))
        self.n_slots = start + m
        self._encode_range(start, start + m)
        for i in range(m):
            self.id2slot[new_ids[i]] = start + i
            if new_ids[i] >= self.next_id:
                self.next_id = new_ids[i] + 1
        self.n_alive += m
        self._place_new_slots(start, m)
        return ids

    cdef _place_new_slots(self, intp_t start, intp_t m):
        """Put the m slots appended at ``start`` into segments (see add)."""
        cdef intp_t k = <intp_t>self.seg_start.size() - 1
        cdef intp_t merged = m
        self.recent_adds += m
        cdef bint lazily = self._merge_lazily()
        # A trailing single-leaf segment acts as an insertion buffer of up to
        # max(leaf_size, min(n / 256, 4096)) slots: screening it costs a few
        # microseconds per query, and it saves the builds of small segments.
        cdef intp_t buffer_max = max(self.leaf_size, min(self.n_alive // 256, 4096))
        if (k >= 0 and self.seg_n_nodes[k] == 1
                and start + m - self.seg_start[k] <= buffer_max):
            # Small adds extend the last segment while it is a single leaf:
            # its ball keeps its centre and grows its radius (O(m d), no
            # rebuild); a tree is built once it outgrows the buffer.
            self._extend_leaf(k, start, start + m)
            self._merge_tail(lazily)
            return
        # Find the segments the new one would absorb under the merge rule,
        # and build them together once.
        if lazily:
            # (no earlier segment qualifies after the build: the sizes after
            # it stay the same, or shrink by the tombstones dropped)
            k = self._lazy_merge_from(m) - 1
        else:
            while k >= 0 and self.seg_end[k] - self.seg_start[k] < 2 * merged:
                merged += self.seg_end[k] - self.seg_start[k]
                k -= 1
        if k + 1 < <intp_t>self.seg_start.size():
            self.seg_end[self.seg_start.size() - 1] = start + m
            self._rebuild_tail(k + 1)
        else:
            self._push_segment(start, start + m)
        self._merge_tail(lazily)

    cdef _extend_leaf(self, intp_t k, intp_t start, intp_t end):
        """Append slots [start, end) to segment k, a single leaf."""
        # raw pointers: creating typed memoryviews would dominate an O(d) add
        cdef intp_t node = self.seg_node0[k], s
        cdef double r
        cdef CoreView v = self._view()
        cdef const float* c = v.node_center + node * self.d
        cdef double* nr = <double*>v.node_radius
        for s in range(start, end):
            r = _slot_distance_bound(&v, self.is32, s, c)
            if r > nr[node]:
                nr[node] = r
        (<intp_t*>v.node_end)[node] = end
        (<intp_t*>v.node_alive)[node] += end - start
        (<float*>v.node_rel)[REL_W * node] = 0.0     # new slots have no relative codes
        self.seg_end[k] = end

    cdef intp_t _segment_of(self, intp_t slot):
        cdef intp_t k
        for k in range(<intp_t>self.seg_start.size()):
            if slot < self.seg_end[k]:
                return k
        return -1

    def remove(self, const intp_t[::1] ids):
        """Tombstone live ids (checked by the caller); returns the count."""
        cdef intp_t i, slot, k, local, n_nodes, node0, mid, m = ids.shape[0]
        cdef intp_t[::1] sid = self._ids
        cdef float[::1] ea = self._ea
        cdef intp_t[::1] na = self._node_alive
        cdef intp_t[::1] ne = self._node_end
        cdef intp_t[::1] nright = self._node_right
        for i in range(m):
            slot = self.id2slot[ids[i]]
            self.id2slot.erase(ids[i])
            sid[slot] = -1
            ea[slot] = NAN    # tombstones always fall into the "verify" band
            k = self._segment_of(slot)
            node0 = self.seg_node0[k]
            n_nodes = self.seg_n_nodes[k]
            local = 0
            while True:
                na[node0 + local] -= 1
                if nright[node0 + local] < 0:
                    break
                if slot < ne[node0 + local + 1]:
                    local = local + 1
                else:
                    local = nright[node0 + local]
        self.n_alive -= m
        if self.n_slots - self.n_alive > max(self.n_slots // 4, 64) or self.n_alive == 0:
            self.rebuild()
        return m

    def update(self, const intp_t[::1] ids, cnp.ndarray X):
        """Overwrite the rows of live ids (checked by the caller) in place; X:
        C-contiguous, the core's dtype, one row per id (checked by the
        caller).  Raw pointers throughout: numpy indexing and typed
        memoryviews cost more than the update itself for one point."""
        cdef intp_t i, slot, k, local, node0, m = ids.shape[0], d = self.d
        cdef intp_t rebuild_from = -1
        cdef bint lazily
        cdef double r
        cdef size_t row = d * self.dtype.itemsize
        cdef const char* src = <const char*>cnp.PyArray_DATA(X)
        cdef CoreView v = self._view()
        cdef double* nr = <double*>v.node_radius
        for i in range(m):
            slot = self.id2slot[ids[i]]
            memcpy(<char*>v.X + slot * row, src + i * row, row)
            if self.is32:
                _encode_point(<const float*>v.X + slot * d, d, self.dpad, <uint8_t*>v.codes,
                              slot, <float*>v.scale + slot, <float*>v.ea + slot,
                              <float*>v.ec + slot, <uint8_t*>v.rows2 + slot * v.stride2)
            else:
                _encode_point(<const double*>v.X + slot * d, d, self.dpad, <uint8_t*>v.codes,
                              slot, <float*>v.scale + slot, <float*>v.ea + slot,
                              <float*>v.ec + slot, <uint8_t*>v.rows2 + slot * v.stride2)
            # every node on the root-to-leaf path grows its radius to cover
            # the new value
            k = self._segment_of(slot)
            node0 = self.seg_node0[k]
            local = 0
            while True:
                r = _slot_distance_bound(&v, self.is32, slot, v.node_center + (node0 + local) * d)
                if r > nr[node0 + local]:
                    nr[node0 + local] = r
                if v.node_right[node0 + local] < 0:
                    self._update_rel(&v, node0 + local, slot)
                    break
                if slot < v.node_end[node0 + local + 1]:
                    local = local + 1
                else:
                    local = v.node_right[node0 + local]
            self.seg_stale[k] += 1
            if (self.seg_stale[k] > max((self.seg_end[k] - self.seg_start[k]) // 2,
                                        self.leaf_size)
                    and (rebuild_from < 0 or k < rebuild_from)):
                rebuild_from = k
        if rebuild_from >= 0:
            # The segments after k hold fewer slots than 2 size(k) together
            # (under either merge rule), so rebuilding the tail from k costs
            # O(size of k).
            lazily = self._merge_lazily()
            self._rebuild_tail(rebuild_from)
            self._merge_tail(lazily)

    cdef void _update_rel(self, const CoreView* v, intp_t node, intp_t slot) noexcept nogil:
        """Re-encode an updated slot against its leaf's relative codes,
        growing the leaf's constants, or turn them off for the leaf if the
        point moved far from the centre."""
        cdef float* rel = <float*>v.node_rel + REL_W * node
        cdef double out[6]
        cdef intp_t j
        if rel[0] == 0.0:
            return
        if self.is32:
            _rel_codes(<const float*>v.X + slot * v.d, v.node_center + node * v.d, v.d,
                       v.dpad8, rel[0], slot, <uint8_t*>v.rhi, <uint8_t*>v.rlo,
                       <uint8_t*>v.r3, out)
        else:
            _rel_codes(<const double*>v.X + slot * v.d, v.node_center + node * v.d, v.d,
                       v.dpad8, rel[0], slot, <uint8_t*>v.rhi, <uint8_t*>v.rlo,
                       <uint8_t*>v.r3, out)
        if not (out[3] <= REL_GROW * rel[4]):
            rel[0] = 0.0
            return
        for j in range(6):
            if out[j] > rel[j + 1]:
                rel[j + 1] = _round_up_f32(out[j])

    # -- queries ------------------------------------------------------------

    def query(self, W, const intp_t[::1] indptr, const intp_t[::1] indices,
              const double[::1] b, int mode, int n_threads):
        """Batched half-space query; returns (counts, ids list, scores list) as arrays."""
        cdef intp_t n_queries = b.shape[0], q, total, off
        self.recent_query_rows += n_queries
        cdef CoreView v = self._view()
        cdef vector[vector[intp_t]] res_ids
        cdef vector[vector[double]] res_sc
        counts = np.zeros(n_queries, dtype=np.intp)
        cdef intp_t[::1] c = counts
        cdef const intp_t* ip = NULL
        cdef const intp_t* ix = NULL
        cdef cnp.ndarray Wa = W
        if n_queries == 0:
            return counts, None, None
        if indptr is not None:
            ip = &indptr[0]
            if indices.shape[0] > 0:
                ix = &indices[0]
        res_ids.resize(n_queries)
        res_sc.resize(n_queries)
        with nogil:
            if self.is32:
                _batch_query(&v, <const float*>v.X, <const float*>cnp.PyArray_DATA(Wa),
                             ip, ix, n_queries, &b[0], mode, n_threads, &c[0],
                             &res_ids[0], &res_sc[0])
            else:
                _batch_query(&v, <const double*>v.X, <const double*>cnp.PyArray_DATA(Wa),
                             ip, ix, n_queries, &b[0], mode, n_threads, &c[0],
                             &res_ids[0], &res_sc[0])
        if mode == MODE_COUNT:
            return counts, None, None
        indptr_out = np.zeros(n_queries + 1, dtype=np.intp)
        np.cumsum(counts, out=indptr_out[1:])
        total = indptr_out[n_queries]
        ids_out = np.empty(total, dtype=np.intp)
        cdef intp_t[::1] io = ids_out
        cdef double[::1] so
        scores_out = None
        if mode == MODE_SCORES:
            scores_out = np.empty(total, dtype=np.float64)
            so = scores_out
        off = 0
        for q in range(n_queries):
            if res_ids[q].size() > 0:
                memcpy(&io[off], res_ids[q].data(), res_ids[q].size() * sizeof(intp_t))
                if mode == MODE_SCORES:
                    memcpy(&so[off], res_sc[q].data(), res_sc[q].size() * sizeof(double))
            off += res_ids[q].size()
        return indptr_out, ids_out, scores_out

    def query_single(self, cnp.ndarray w, double b, int mode, int n_threads):
        """One dense query, on the calling thread or, if it is large, split
        across up to n_threads threads (see ``_query_split``).

        ``w``: C-contiguous 1-D array of the core's dtype (checked by the
        caller).  Returns ``(count, ids, scores)``; ids/scores are None for
        MODE_COUNT, scores None unless MODE_SCORES.
        """
        self.recent_query_rows += 1
        cdef CoreView v = self._view()
        cdef QueryBuf* qb = _alloc_qbuf(self.d, 0)
        # this thread's result buffers, empty between calls; a call made
        # while an outer one still holds its results there (from a garbage
        # collector callback or a finaliser, run by an allocation below) uses
        # buffers of its own
        cdef vector[intp_t]* res_ids = &sqd_thread_buffers().ids
        cdef vector[double]* res_sc = &sqd_thread_buffers().scores
        cdef vector[intp_t] own_ids
        cdef vector[double] own_sc
        cdef intp_t cnt, n
        if res_ids.size() or res_sc.size():
            res_ids = &own_ids
            res_sc = &own_sc
        cdef intp_t[::1] io
        cdef double[::1] so
        if qb == NULL:
            raise MemoryError()
        try:
            with nogil:
                if self.is32:
                    _load_query(qb, 0, v.d, <const float*>cnp.PyArray_DATA(w), NULL, NULL)
                    cnt = _query_split(&v, <const float*>v.X, qb, b, mode, n_threads,
                                       res_ids, res_sc)
                else:
                    _load_query(qb, 0, v.d, <const double*>cnp.PyArray_DATA(w), NULL, NULL)
                    cnt = _query_split(&v, <const double*>v.X, qb, b, mode, n_threads,
                                       res_ids, res_sc)
                _free_qbuf(qb)
            if mode == MODE_COUNT:
                return cnt, None, None
            n = res_ids.size()
            ids = np.empty(n, dtype=np.intp)
            scores = None
            if n:
                io = ids
                memcpy(&io[0], res_ids.data(), n * sizeof(intp_t))
            if mode == MODE_SCORES:
                scores = np.empty(n, dtype=np.float64)
                if n:
                    so = scores
                    memcpy(&so[0], res_sc.data(), n * sizeof(double))
            return cnt, ids, scores
        finally:
            res_ids.clear()
            res_sc.clear()
            if res_ids.capacity() > SINGLE_KEEP:     # do not hold on to a huge result
                res_ids.shrink_to_fit()
                res_sc.shrink_to_fit()

    def search(self, W, const intp_t[::1] indptr, const intp_t[::1] indices,
               intp_t n_queries, intp_t k, int n_threads):
        """Exact top-k inner products; (scores float64, ids) of shape (n_queries, k)."""
        self.recent_query_rows += n_queries
        cdef CoreView v = self._view()
        scores = np.empty((n_queries, k), dtype=np.float64)
        ids = np.empty((n_queries, k), dtype=np.intp)
        cdef double[:, ::1] s = scores
        cdef intp_t[:, ::1] i = ids
        cdef const intp_t* ip = NULL
        cdef const intp_t* ix = NULL
        cdef cnp.ndarray Wa = W
        if n_queries == 0 or k == 0:
            return scores, ids
        if indptr is not None:
            ip = &indptr[0]
            if indices.shape[0] > 0:
                ix = &indices[0]
        if n_queries < 4 * n_threads:
            n_threads = 1
        with nogil:
            if self.is32:
                _batch_search(&v, <const float*>v.X, <const float*>cnp.PyArray_DATA(Wa),
                              ip, ix, n_queries, k, n_threads, &s[0, 0], &i[0, 0])
            else:
                _batch_search(&v, <const double*>v.X, <const double*>cnp.PyArray_DATA(Wa),
                              ip, ix, n_queries, k, n_threads, &s[0, 0], &i[0, 0])
        return scores, ids

    # -- introspection ------------------------------------------------------

    def query_stats(self, w, double b, int n_threads=1):
        """Work done by one query (counted, on up to n_threads threads):
        nodes bounded, points screened through their codes, points refined
        (through their level-2 codes, or stage 1 of the relative codes,
        which takes every point of a leaf that skips stage 0), points
        that reach stage 2 of the relative codes ("refined2"), points
        verified exactly, points reported by whole subtrees, and the
        subtrees the query was split into (0: it ran on one thread)."""
        cdef CoreView v = self._view()
        cdef QueryBuf* qb = _alloc_qbuf(self.d, 0)
        cdef vector[intp_t] ids
        cdef vector[double] sc
        cdef intp_t j, cnt
        if qb == NULL:
            raise MemoryError()
        w = np.asarray(w, dtype=np.float64)
        for j in range(self.d):
            qb.w[j] = w[j]
        with nogil:
            if self.is32:
                cnt = _query_split(&v, <const float*>v.X, qb, b, MODE_COUNT, n_threads, &ids, &sc)
            else:
                cnt = _query_split(&v, <const double*>v.X, qb, b, MODE_COUNT, n_threads, &ids,
                                   &sc)
        out = {"count": cnt, "nodes": qb.n_nodes, "screened": qb.n_screened,
               "refined": qb.n_refined, "refined2": qb.n_refined2,
               "verified": qb.n_verified, "bulk": qb.n_bulk, "subtrees": qb.n_tasks}
        _free_qbuf(qb)
        return out

    def tree_arrays(self):
        """Copies of the node arrays and segment table (tests, diagnostics)."""
        cdef intp_t k, n = self.n_nodes_used
        segs = np.array([(self.seg_start[k], self.seg_end[k], self.seg_node0[k],
                          self.seg_n_nodes[k]) for k in range(<intp_t>self.seg_start.size())],
                        dtype=np.intp).reshape(-1, 4)
        return {"start": self._node_start[:n].copy(), "end": self._node_end[:n].copy(),
                "right": self._node_right[:n].copy(), "alive": self._node_alive[:n].copy(),
                "center": self._node_center[:n].copy(), "radius": self._node_radius[:n].copy(),
                "rel": self._node_rel[:n].copy(),
                "segments": segs}

    def rel_codes(self, intp_t slot):
        """Signed (q_hi, q_lo, q_3) leaf-relative codes of a slot (tests;
        q_3 is None without stage 2)."""
        cdef intp_t j, byte, dp8 = self.dpad8, half = self.dpad8 // 2
        hi = np.empty(self.d, dtype=np.int64)
        lo = np.empty(self.d, dtype=np.int64)
        q3 = np.empty(self.d, dtype=np.int64)
        rhi, rlo, r3 = self._rhi, self._rlo, self._r3
        for j in range(self.d):
            byte = (slot >> 4) * 8 * dp8 + (j >> 3) * 64 + (slot & 15) * 4 + (j & 3)
            sh = 4 if (j & 4) else 0
            hi[j] = ((int(rhi[byte]) >> sh) & 15) - 8
            lo[j] = ((int(rlo[byte]) >> sh) & 15) - 8
            if self.r3w:
                byte = slot * half + (j - half if j >= half else j)
                sh = 4 if j >= half else 0
                q3[j] = ((int(r3[byte]) >> sh) & 15) - 8
        return hi, lo, (q3 if self.r3w else None)

    def _check_rel(self, intp_t node):
        s4, A0, C0, A1, C1, A2, C2 = (float(x) for x in self._node_rel[node])
        c = self._node_center[node].astype(np.float64)
        for s in range(self._node_start[node], self._node_end[node]):
            if self._ids[s] < 0:
                continue
            hi, lo, q3 = self.rel_codes(s)
            if hi.min() < -7 or hi.max() > 7:
                raise AssertionError("high nibble code out of range")
            r = self._X[s].astype(np.float64) - c
            q8 = 16 * hi + lo
            if (np.linalg.norm(r - s4 * hi) > C0 or np.linalg.norm(r - s4 / 16 * q8) > C1
                    or np.linalg.norm(s4 * hi) > A0 or np.linalg.norm(s4 / 16 * q8) > A1):
                raise AssertionError("relative-code constants do not cover slot %d" % s)
            if q3 is not None:
                if q3.min() < -8 or q3.max() > 7:
                    raise AssertionError("third-level code out of range")
                q12 = 16 * q8 + q3
                if (np.linalg.norm(r - s4 / 256 * q12) > C2
                        or np.linalg.norm(s4 / 256 * q12) > A2):
                    raise AssertionError("third-level constants do not cover slot %d" % s)

    def check_invariants(self):
        """Verify every structural invariant; raises AssertionError (tests only)."""
        cdef intp_t k, i, s, node0, n_nodes, alive
        ids = self._ids[:self.n_slots]
        live = ids[ids >= 0]
        if live.shape[0] != self.n_alive or len(set(live.tolist())) != self.n_alive:
            raise AssertionError("live ids inconsistent with n_alive")
        if <intp_t>self.id2slot.size() != self.n_alive:
            raise AssertionError("id2slot size mismatch")
        for s in range(self.n_slots):
            if ids[s] >= 0 and self.id2slot[ids[s]] != s:
                raise AssertionError("id2slot does not point back")
        prev_end = 0
        for k in range(<intp_t>self.seg_start.size()):
            if self.seg_start[k] != prev_end:
                raise AssertionError("segments not contiguous")
            prev_end = self.seg_end[k]
            node0 = self.seg_node0[k]
            n_nodes = self.seg_n_nodes[k]
            if self._node_start[node0] != self.seg_start[k] or \
                    self._node_end[node0] != self.seg_end[k]:
                raise AssertionError("root does not cover its segment")
            for i in range(n_nodes):
                a, e = self._node_start[node0 + i], self._node_end[node0 + i]
                r = self._node_right[node0 + i]
                if r >= 0:
                    if not (i + 1 < r < n_nodes):
                        raise AssertionError("bad child index")
                    if (self._node_start[node0 + i + 1] != a
                            or self._node_end[node0 + r] != e
                            or self._node_end[node0 + i + 1] != self._node_start[node0 + r]
                            or not a < self._node_start[node0 + r] < e):
                        raise AssertionError("children do not split their parent")
                alive = int((ids[a:e] >= 0).sum())
                if alive != self._node_alive[node0 + i]:
                    raise AssertionError("node_alive wrong")
                pts = self._X[a:e].astype(np.float64)
                if e > a:
                    dist = np.sqrt(((pts - self._node_center[node0 + i]) ** 2).sum(axis=1))
                    if dist.max() > self._node_radius[node0 + i]:
                        raise AssertionError("radius does not cover the node")
                if r < 0 and self._node_rel[node0 + i, 0] > 0:
                    self._check_rel(node0 + i)
        if prev_end != self.n_slots:
            raise AssertionError("segments do not cover the slots")
        return True
