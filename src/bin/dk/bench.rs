//! `dk bench`: the divergence on the best backend present (or the one asked for), over
//! model-realistic vocabularies, every result checked on sampled rows against the f64 reference,
//! timed, and reported as a fraction of the copy-bandwidth floor measured in the same run; then
//! MoE dispatch (route, permute, combine, forward and backward) for the shapes of ANCHORS.md,
//! checked against the CPU backend (`moe.rs`); then grouped-query attention, forward and
//! forward + backward, checked against an f64 computation on sampled rows (`attention.rs`); then
//! the fused linear divergence against its four GEMMs alone (`fused.rs`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use distill_kernels::device::{cuda_device_count, cuda_driver_present};
use distill_kernels::divergence::{Kind, Params};
use distill_kernels::{Context, DType, Element, ErrorKind};

use crate::attention::{self, AttnConfig, AttnRow, AttnShape, CPU_ATTN_SHAPES, CUDA_ATTN_SHAPES};
use crate::backend::{median, Inputs, Outputs, Runner};
use crate::cli::{self, usage, Opt, UsageError};
use crate::data::{mix, sample_rows};
use crate::fused::{self, FusedConfig, FusedRow, CPU_FUSED_SHAPES, CUDA_FUSED_SHAPES};
use crate::moe::{self, MoeConfig, MoeRow, Shape, ALL_SHAPES};

/// Qwen2.5/Qwen3, Phi-4-mini, Llama 4, Gemma-class vocabularies.
pub const DEFAULT_VOCABS: [usize; 4] = [151_936, 200_064, 202_048, 262_144];

pub const HELP: &str = "\
dk bench: the divergence (forward KL, reverse KL, JSD), MoE dispatch (route, permute, combine,
forward and backward), attention (forward, forward + backward) and the fused linear JSD, on the
best backend present, checked and timed

usage: dk bench [OPS] [options]     (OPS: 'dk bench attention' = 'dk bench --ops attention')

options (an option that sets rows the run does not include, such as --vocab with --ops moe, is
an error rather than ignored):
  --device D        cpu | cuda | cuda:N | auto (default auto: CUDA device 0 when it is present
                    and its kernels load, else the CPU)
  --ops O,...       divergence,moe,attention,fused (default all four; 'all' also works); fused:
                    the fused linear JSD from hidden states and the lm_head (CUDA: N 4096,
                    H 3072, V 200064 and N 16384, H 5120, V 202048, against the four GEMMs
                    alone; CPU: N 40, H 64, V 3001)
  --kinds K,...     forward_kl,reverse_kl,jsd (default all three; 'all' also works; --kind
                    is the same option); the divergence only (fused runs JSD at T 1)
  --dtype T,...     bf16 | f16 | f32, or a list (default bf16); student and teacher share it,
                    and it is the MoE activations' dtype (router logits are always f32) and
                    the attention and fused operands' (bf16 / f16 only on CUDA: f32 skipped)
  --rows N          divergence rows per call (default 4096 on CUDA, 8 on the CPU; --quick:
                    1024 / 2)
  --vocab V,...     vocabulary sizes (default 151936,200064,202048,262144)
  --iters K         timed runs per row, the median is reported (default 20 on CUDA, 5 on the
                    CPU; --quick: 5 / 1; fused takes at most 10)
  --passes P,...    all | fwd+bwd | fwd | in-place, or a list (default all: forward+backward,
                    then forward only; in-place: forward+backward with the gradient written
                    over the student logits); the divergence only
  --beta B          JSD teacher weight in [0, 1] (default 0.5; 0 is forward KL, 1 reverse
                    KL); the divergence and fused
  --temperature T   softmax temperature > 0 (default 1.0); the divergence only
  --check-rows K    rows checked against the reference per result (default 8 for the
                    divergence and for attention's query and key rows, 64 for MoE outputs,
                    4 for fused; all rows when there are at most K; the CPU's fused shape
                    is always checked whole)
  --tokens N        MoE tokens per shape (default 16384 on CUDA, 2048 on the CPU; --quick:
                    2048 / 256)
  --moe-shapes S,.. scout,maverick,qwen3 (default all three; 'all' also works):
                      scout     Llama 4 Scout, H 5120, E 16, sigmoid top-1, weight scales the
                                expert input (permute scaled, combine unweighted)
                      maverick  H 5120, E 128, sigmoid top-1 (Llama 4 Maverick's router), weight
                                on the combine
                      qwen3     Qwen3-MoE, H 2048, E 128, softmax top-8 renormalised, weight on
                                the combine
  --attn-shapes S,. attention shapes (default on CUDA phi4-mini,llama4,varlen; on the CPU
                    small,small-varlen; 'all' also works, but the CUDA shapes take hours
                    on the CPU: ~90 s per phi4-mini forward call, ~10 min per llama4 one):
                      phi4-mini     B 4, S 4096, 24/8 heads, D 128, causal (docs/ANCHORS.md)
                      llama4        B 1, S 16384, 40/8 heads, D 128, causal (docs/ANCHORS.md)
                      varlen        8 packed sequences, 16384 tokens, 24/8, D 128, causal
                      small         B 2, Sq 96, Sk 160, 8/2, D 64, causal (CPU)
                      small-varlen  5 packed sequences (empty, 1 token, Sq > Sk), 6/2, D 128
  --seed S          seed of the random logits (default: from the clock, printed)
  --quick           fewer rows and runs (what CI runs)
  --json PATH       also write every result to PATH as JSON (its commit field is the value of
                    DK_BENCH_COMMIT, which scripts/gpu-check.sh sets; null without it)
  -h, --help        this help

Inputs: fresh random logits, student ~ N(0, 3^2), teacher = 0.9 * student + N(0, 1.5^2),
reduction batchmean. The reference is dk's own f64 divergence (src/bin/dk/reference.rs, which
shares no code with the library) on the same (rounded) inputs; the gradient compared is scale/T
times its gradient.

Each result row: shape, dtype, kind, pass, median time, GB/s (bytes: both inputs read + the
gradient written for fwd+bwd; both inputs read for fwd), that rate as a fraction of the copy
bandwidth measured in the same run (host memcpy on the CPU, device-to-device copy on CUDA;
bytes read + written), and the errors against the reference over the checked rows: the gradient
as ||g - r|| / ||ref|| (and max |g - r|), r being the f64 reference rounded to the gradient's dtype
(the best answer the output can hold: f16 gradients of a batchmean over thousands of rows are
subnormal and lose several % to rounding alone; the error against the unrounded reference is in
the JSON), the loss as the largest relative error of the checked per-row losses and of the reduced
loss. Tolerances: bf16/f16 gradient 1e-2, loss 1e-4; f32 both 1e-5. Every output is poisoned
with NaN before the checked run; NaN never passes.

MoE rows (per shape: route, permute fwd/bwd, combine fwd/bwd; backward = the kernels the library's
backward is made of: permute's is a combine (weighted, plus a slot-dot for the weight gradient,
when the forward scaled), combine's a permute (scaled, plus a slot-dot, when weighted)): median
time, GB/s and fraction of the floor as cuda/MOE.md defines it (route N*E*4 + 4*(3*N*k + R);
permute 2*R*H*b; combine and slot-dot (R + N)*H*b; b = element size, R = N*k permuted rows), and of
the strict floor (each operand once). On the CPU a shape small enough for the caches can pass 100 %
of a floor measured by copying 256 MiB (from memory, not cache). Checks: the route against the CPU
backend on every token (on CUDA, f32 near-ties within 1e-5 may pick either expert: validated and
counted), weights 1e-5, counts/offsets/perm/position exact; permute/combine/slot-dot against the
CPU backend on sampled rows (unscaled permute bitwise; activations 1e-2 bf16/f16, 1e-5 f32; weight
gradient 1e-5); outputs poisoned first and scanned for unwritten elements; and a second poisoned
run must give bitwise identical outputs. On CUDA each MoE run is timed with events after a read
pass over a zeroed 256 MiB buffer that evicts the L2 cache and leaves no dirty line to write back
inside the run, queued behind GPU work so that the events time the GPU, not the host's launch rate;
'host us' is the host's time to enqueue one run (library calls and launches).

Attention rows (per shape and dtype: fwd; fwd+bwd = the forward call then the deterministic
backward; fwd+bwd/a = the same with deterministic = false, dQ summed by f32 atomics as FA2 does):
median time and FLOP/s (TFLOP/s on CUDA, GFLOP/s on the CPU) counted as docs/ANCHORS.md does:
4*Hq*D per visible (query, key) pair, S^2/2 pairs for causal Sq = Sk, x3.5 for fwd+bwd; on
CUDA, for the docs/ANCHORS.md shapes, the ratio to its FlashAttention-2 rate
(an H200 in another run; python/bench.py --ops attention measures FA2 and cuDNN in the same run).
Checks: out and lse on sampled query rows (all heads) against an f64 forward written in dk; rows
that see no key exactly out 0, lse -inf; dq on the sampled query rows and dk / dv on sampled key
rows against the f64 backward given the run's own out and lse; tolerances out / dq / dk / dv
1e-2 bf16/f16, 1e-5 f32 (||x - ref|| / ||ref||), lse 1e-4 (relative to max(1, |ref|)); outputs
poisoned first and scanned; a second poisoned run must give the same bits. f32 runs on the CPU
backend only.

exit status: 0 all checks passed, 1 a check failed or the run failed, 2 bad usage.
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    FwdBwd,
    Fwd,
    /// Forward + backward with the gradient written over the student logits.
    InPlace,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::FwdBwd => "fwd+bwd",
            Pass::Fwd => "fwd",
            Pass::InPlace => "in-place",
        }
    }
}

struct Config {
    device: DeviceChoice,
    divergence: bool,
    moe: bool,
    attention: bool,
    fused: bool,
    /// `--attn-shapes`, when given.
    attn_shapes: Option<Vec<AttnShape>>,
    moe_shapes: Vec<Shape>,
    tokens: Option<usize>,
    kinds: Vec<Kind>,
    dtypes: Vec<DType>,
    rows: Option<usize>,
    vocabs: Vec<usize>,
    iters: Option<usize>,
    passes: Vec<Pass>,
    beta: f32,
    temperature: f32,
    /// `--check-rows`, when given.
    check_rows: Option<usize>,
    seed: Option<u64>,
    quick: bool,
    json: Option<PathBuf>,
}

fn parse_kind(s: &str) -> Result<Vec<Kind>, UsageError> {
    if s == "all" {
        return Ok(vec![Kind::ForwardKl, Kind::ReverseKl, Kind::Jsd]);
    }
    match Kind::from_name(s) {
        Some(k) => Ok(vec![k]),
        None => usage!("--kinds: unknown kind '{s}' (forward_kl, reverse_kl, jsd or all)"),
    }
}

fn parse_shape(s: &str) -> Result<Vec<Shape>, UsageError> {
    if s == "all" {
        return Ok(ALL_SHAPES.to_vec());
    }
    match Shape::from_name(s) {
        Some(x) => Ok(vec![x]),
        None => usage!("--moe-shapes: unknown shape '{s}' (scout, maverick, qwen3 or all)"),
    }
}

fn parse_attn_shape(s: &str) -> Result<Vec<AttnShape>, UsageError> {
    if s == "all" {
        return Ok(attention::ALL_ATTN_SHAPES.to_vec());
    }
    match AttnShape::from_name(s) {
        Some(x) => Ok(vec![x]),
        None => usage!(
            "--attn-shapes: unknown shape '{s}' (phi4-mini, llama4, varlen, small, small-varlen or all)"
        ),
    }
}

fn parse_dtype(s: &str) -> Result<DType, UsageError> {
    match DType::ALL.into_iter().find(|d| d.name() == s) {
        Some(d) => Ok(d),
        None => usage!("--dtype: unknown dtype '{s}' (bf16, f16 or f32)"),
    }
}

fn dedup<T: PartialEq>(v: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// Parses `dk bench` options; `Ok(None)` means help was asked for.
fn parse(args: &[String]) -> Result<Option<Config>, UsageError> {
    let opts = cli::parse(
        "bench",
        args,
        &["quick", "help"],
        &[
            "device",
            "ops",
            "moe-shapes",
            "attn-shapes",
            "tokens",
            "kinds",
            "kind",
            "dtype",
            "rows",
            "vocab",
            "iters",
            "passes",
            "beta",
            "temperature",
            "check-rows",
            "seed",
            "json",
        ],
    )?;
    // The valued options given (for the checks of repeats and of options no row reads).
    let named: Vec<String> = opts
        .iter()
        .filter_map(|o| match o {
            cli::Opt::Value(n, _) => Some(n.clone()),
            _ => None,
        })
        .collect();
    let given = |name: &str| named.iter().any(|n| n == name);
    // --kind is another spelling of --kinds: both given is a repeat, as for any other option.
    if given("kind") && given("kinds") {
        return Err(cli::UsageError(
            "options '--kind' and '--kinds' of 'dk bench' are the same option, given twice".into(),
        ));
    }
    let mut c = Config {
        device: DeviceChoice::Auto,
        divergence: true,
        moe: true,
        attention: true,
        fused: true,
        attn_shapes: None,
        moe_shapes: ALL_SHAPES.to_vec(),
        tokens: None,
        kinds: vec![Kind::ForwardKl, Kind::ReverseKl, Kind::Jsd],
        dtypes: vec![DType::BF16],
        rows: None,
        vocabs: DEFAULT_VOCABS.to_vec(),
        iters: None,
        passes: vec![Pass::FwdBwd, Pass::Fwd],
        beta: 0.5,
        temperature: 1.0,
        check_rows: None,
        seed: None,
        quick: false,
        json: None,
    };
    for opt in opts {
        match opt {
            Opt::Flag(f) if f == "help" => return Ok(None),
            Opt::Flag(_) => c.quick = true,
            Opt::Value(name, value) => {
                let v = value.as_str();
                match name.as_str() {
                    "device" => {
                        c.device = match v {
                            "auto" => DeviceChoice::Auto,
                            "cpu" => DeviceChoice::Cpu,
                            "cuda" => DeviceChoice::Cuda(0),
                            _ => match v.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
                                Some(Ok(n)) => DeviceChoice::Cuda(n),
                                _ => {
                                    usage!("--device: '{v}' is not one of cpu, cuda, cuda:N, auto")
                                }
                            },
                        }
                    }
                    "ops" => {
                        let ops = cli::list(&name, v, |s| {
                            match s {
                            "divergence" | "moe" | "attention" | "fused" | "all" => {
                                Ok(s.to_string())
                            }
                            _ => usage!(
                                "--ops: unknown operation '{s}' (divergence, moe, attention, fused or all)"
                            ),
                        }
                        })?;
                        let all = ops.iter().any(|o| o == "all");
                        c.divergence = all || ops.iter().any(|o| o == "divergence");
                        c.moe = all || ops.iter().any(|o| o == "moe");
                        c.attention = all || ops.iter().any(|o| o == "attention");
                        c.fused = all || ops.iter().any(|o| o == "fused");
                    }
                    "moe-shapes" => {
                        c.moe_shapes = dedup(cli::list(&name, v, parse_shape)?.concat());
                    }
                    "attn-shapes" => {
                        c.attn_shapes =
                            Some(dedup(cli::list(&name, v, parse_attn_shape)?.concat()));
                    }
                    "tokens" => {
                        let n: usize = cli::number(&name, v)?;
                        if n == 0 || n.saturating_mul(32) > i32::MAX as usize {
                            usage!("--tokens must be in 1 ..= 2^26 - 1");
                        }
                        c.tokens = Some(n);
                    }
                    "kinds" | "kind" => {
                        c.kinds = dedup(cli::list(&name, v, parse_kind)?.concat());
                    }
                    "dtype" => c.dtypes = dedup(cli::list(&name, v, parse_dtype)?),
                    "rows" => {
                        let n: usize = cli::number(&name, v)?;
                        if n == 0 || n > i32::MAX as usize {
                            usage!("--rows must be in 1 ..= 2^31 - 1");
                        }
                        c.rows = Some(n);
                    }
                    "vocab" => {
                        let vs = cli::list(&name, v, |s| cli::number::<usize>("vocab", s))?;
                        if let Some(bad) = vs.iter().find(|&&x| x == 0 || x > i32::MAX as usize) {
                            usage!("--vocab: {bad} is out of range (1 ..= 2^31 - 1)");
                        }
                        c.vocabs = dedup(vs);
                    }
                    "iters" => {
                        let k: usize = cli::number(&name, v)?;
                        if k == 0 {
                            usage!("--iters must be at least 1");
                        }
                        c.iters = Some(k);
                    }
                    "passes" => {
                        let mut passes = Vec::new();
                        for p in v.split(',').map(str::trim) {
                            match p {
                                "all" => passes.extend([Pass::FwdBwd, Pass::Fwd]),
                                "fwd+bwd" | "fwdbwd" => passes.push(Pass::FwdBwd),
                                "fwd" => passes.push(Pass::Fwd),
                                "in-place" | "inplace" => passes.push(Pass::InPlace),
                                _ => usage!(
                                    "--passes: '{p}' is not one of all, fwd+bwd, fwd, in-place"
                                ),
                            }
                        }
                        c.passes = dedup(passes);
                    }
                    "beta" => {
                        c.beta = cli::number(&name, v)?;
                        if !(0.0..=1.0).contains(&c.beta) {
                            usage!("--beta must be in [0, 1], got {v}");
                        }
                    }
                    "temperature" => {
                        c.temperature = cli::number(&name, v)?;
                        if !(c.temperature.is_finite() && c.temperature > 0.0) {
                            usage!("--temperature must be finite and > 0, got {v}");
                        }
                    }
                    "check-rows" => {
                        let k: usize = cli::number(&name, v)?;
                        if k == 0 {
                            usage!("--check-rows must be at least 1");
                        }
                        c.check_rows = Some(k);
                    }
                    "seed" => c.seed = Some(cli::number(&name, v)?),
                    "json" => {
                        let path = PathBuf::from(v);
                        // Before the run, not after it: a typo must not cost a whole benchmark.
                        if let Err(e) = check_writable(&path) {
                            usage!("--json: cannot write {}: {e}", path.display());
                        }
                        c.json = Some(path);
                    }
                    _ => unreachable!("cli::parse only returns declared options"),
                }
            }
        }
    }
    // An option for rows the run does not have would be ignored: say so instead.
    for (name, applies, rows) in [
        ("kinds", c.divergence, "divergence"),
        ("kind", c.divergence, "divergence"),
        ("rows", c.divergence, "divergence"),
        ("vocab", c.divergence, "divergence"),
        ("passes", c.divergence, "divergence"),
        ("temperature", c.divergence, "divergence"),
        ("beta", c.divergence || c.fused, "divergence and fused"),
        ("tokens", c.moe, "MoE"),
        ("moe-shapes", c.moe, "MoE"),
        ("attn-shapes", c.attention, "attention"),
    ] {
        if given(name) && !applies {
            usage!(
                "option '--{name}' sets the {rows} rows, which this run does not include (--ops)"
            );
        }
    }
    Ok(Some(c))
}

/// Gradient and loss tolerances (relative) for a dtype, as DESIGN.md sets them.
fn tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::BF16 | DType::F16 => (1e-2, 1e-4),
    }
}

/// The reference for one sampled row: loss and the unscaled gradient w.r.t. s/T.
struct RefRow {
    loss: f64,
    grad: Vec<f64>,
}

fn reference(params: &Params, inputs: &Inputs) -> Vec<RefRow> {
    let kind = params.effective_kind();
    let beta = params.beta as f64;
    let inv_t = 1.0 / params.temperature as f64;
    let mut out: Vec<Option<RefRow>> = (0..inputs.student.len()).map(|_| None).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(out.len())
        .max(1);
    let per = out.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (k, chunk) in out.chunks_mut(per).enumerate() {
            scope.spawn(move || {
                for (j, slot) in chunk.iter_mut().enumerate() {
                    let i = k * per + j;
                    let b: Vec<f64> = inputs.student[i].iter().map(|x| x * inv_t).collect();
                    let a: Vec<f64> = inputs.teacher[i].iter().map(|x| x * inv_t).collect();
                    let mut grad = vec![0.0; b.len()];
                    let loss = crate::reference::divergence_row(kind, beta, &b, &a, &mut grad);
                    *slot = Some(RefRow { loss, grad });
                }
            });
        }
    });
    out.into_iter()
        .map(|r| r.expect("every row computed"))
        .collect()
}

#[derive(Default)]
struct Check {
    /// ||g - round(ref)|| / ||ref||, the largest over the checked rows.
    grad_rel: Option<f64>,
    /// ||g - ref|| / ||ref|| against the unrounded reference (JSON only).
    grad_rel_exact: Option<f64>,
    grad_abs: Option<f64>,
    loss_rel: f64,
    loss_abs: f64,
    problems: Vec<String>,
}

/// `diff` relative to `reference`; absolute where the reference is 0 or below f32's normal
/// range, which an f32 result cannot hold to relative precision (a loss of 1e-180 at T = 0.01
/// comes back as 0, exactly right to f32).
fn rel(diff: f64, reference: f64) -> f64 {
    if reference.abs() >= f32::MIN_POSITIVE as f64 {
        diff / reference.abs()
    } else {
        diff
    }
}

/// Compares one run with the reference on the sampled rows. `scale` is the reduction's factor.
#[allow(clippy::too_many_arguments)]
fn check(
    out: &Outputs,
    refs: &[RefRow],
    samples: &[usize],
    dtype: DType,
    scale: f64,
    inv_t: f64,
    with_grad: bool,
) -> Check {
    let mut c = Check::default();
    let bad_rows = out.per_token.iter().filter(|x| !x.is_finite()).count();
    if bad_rows > 0 {
        c.problems.push(format!(
            "{bad_rows} per-row losses not finite (unwritten or NaN)"
        ));
    }
    let mut sampled_sum = 0.0;
    for (i, &r) in samples.iter().enumerate() {
        let got = out.per_token[r] as f64;
        let d = (got - refs[i].loss).abs();
        c.loss_abs = c.loss_abs.max(d);
        c.loss_rel = c.loss_rel.max(rel(d, refs[i].loss));
        if d.is_nan() {
            c.loss_rel = f64::NAN;
        }
        sampled_sum += refs[i].loss;
    }
    // Reduced loss: the reference on sampled rows, the backend's own per-row values elsewhere
    // (all rows are sampled on small runs, so there it is the reference throughout).
    let others: f64 = (0..out.per_token.len())
        .filter(|r| samples.binary_search(r).is_err())
        .map(|r| out.per_token[r] as f64)
        .sum();
    let want = scale * (sampled_sum + others);
    let d = (out.loss as f64 - want).abs();
    c.loss_abs = c.loss_abs.max(d);
    c.loss_rel = if d.is_nan() {
        f64::NAN
    } else {
        c.loss_rel.max(rel(d, want))
    };
    if with_grad {
        let (mut gr, mut gx, mut ga) = (0.0f64, 0.0f64, 0.0f64);
        let mut unwritten = 0usize;
        let max_nan = |acc: f64, x: f64| {
            if acc.is_nan() || x.is_nan() {
                f64::NAN
            } else {
                acc.max(x)
            }
        };
        for (i, row) in out.grad_rows.iter().enumerate() {
            let (mut num, mut num_exact, mut den) = (0.0, 0.0, 0.0);
            for (&g, &e) in row.iter().zip(&refs[i].grad) {
                let exact = e * scale * inv_t;
                // The closest answer the gradient's dtype can hold: f16 gradients of a batchmean
                // over thousands of rows are subnormal, and their rounding alone is several %.
                let best = round_to(dtype, exact);
                if !g.is_finite() {
                    unwritten += 1;
                }
                num += (g - best) * (g - best);
                num_exact += (g - exact) * (g - exact);
                den += exact * exact;
                ga = max_nan(ga, (g - best).abs());
            }
            let ratio = |num: f64| {
                if den > 0.0 {
                    (num / den).sqrt()
                } else {
                    num.sqrt()
                }
            };
            gr = max_nan(gr, ratio(num));
            gx = max_nan(gx, ratio(num_exact));
        }
        if unwritten > 0 {
            c.problems.push(format!(
                "{unwritten} gradient entries in the checked rows not finite (unwritten or NaN)"
            ));
            gr = f64::NAN;
        }
        c.grad_rel = Some(gr);
        c.grad_rel_exact = Some(gx);
        c.grad_abs = Some(ga);
    }
    c
}

/// Rounds an f64 to the nearest value of `dtype` (what a perfect kernel would store).
fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::BF16 => <half::bf16 as Element>::from_f64(x).to_f64(),
        DType::F16 => <half::f16 as Element>::from_f64(x).to_f64(),
    }
}

struct Row {
    dtype: DType,
    kind: Kind,
    n: usize,
    v: usize,
    pass: Pass,
    iters: usize,
    median_s: f64,
    min_s: f64,
    bytes: f64,
    check: Check,
    error: Option<String>,
    ok: bool,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes / self.median_s / 1e9
    }
}

pub(crate) fn pct(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x < 0.01 {
        format!("{:.3}%", 100.0 * x)
    } else if x < 0.1 {
        format!("{:.2}%", 100.0 * x)
    } else {
        format!("{:.1}%", 100.0 * x)
    }
}

pub(crate) fn sci(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_nan() => "NaN".into(),
        Some(0.0) => "0".into(),
        Some(x) => format!("{x:.1e}"),
        None => "-".into(),
    }
}

const HEADER: &str = "shape           dtype  kind        pass      time ms       GB/s  of floor  grad rel  grad abs  loss rel  check";

fn format_row(r: &Row, copy_bw: f64) -> String {
    let shape = format!("{}x{}", r.n, r.v);
    let (time, gbps, floor) = if r.error.is_some() || r.median_s.is_nan() {
        ("-".to_string(), "-".to_string(), "-".to_string())
    } else {
        (
            format!("{:.3}", r.median_s * 1e3),
            format!("{:.1}", r.gbps()),
            pct(r.gbps() * 1e9 / copy_bw),
        )
    };
    let status = match (&r.error, r.ok) {
        (Some(e), _) => format!("ERROR: {e}"),
        (None, true) => "ok".into(),
        (None, false) => {
            let mut s = "FAIL".to_string();
            if !r.check.problems.is_empty() {
                s += &format!(" ({})", r.check.problems.join("; "));
            }
            s
        }
    };
    format!(
        "{shape:<15} {:<6} {:<11} {:<8} {time:>8} {gbps:>10} {floor:>9} {:>9} {:>9} {:>9}  {status}",
        r.dtype.name(),
        r.kind.name(),
        r.pass.name(),
        sci(r.check.grad_rel),
        sci(r.check.grad_abs),
        sci((r.error.is_none()).then_some(r.check.loss_rel)),
    )
}

/// Whether `path` can be written: an existing file is opened for appending (not truncated), a
/// new one is created and removed again.
fn check_writable(path: &std::path::Path) -> std::io::Result<()> {
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    if !existed {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

pub(crate) fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The items of a JSON array of strings, `"a", "b"` (without the brackets).
pub(crate) fn json_strs<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    items
        .into_iter()
        .map(|x| json_str(x.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn json_num(x: f64) -> String {
    if !x.is_finite() {
        "null".into()
    } else if x == 0.0 || (1e-4..1e15).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

pub(crate) fn json_opt(x: Option<f64>) -> String {
    x.map_or("null".into(), json_num)
}

struct RunInfo<'a> {
    device: &'a str,
    backend: &'a str,
    copy_bw: f64,
    copy_method: &'a str,
    /// How each timed run of `time_parts` (MoE, attention, fused) starts with an evicted L2;
    /// `None` on the CPU.
    l2_flush: Option<&'a str>,
    n: usize,
    iters: usize,
    seed: u64,
    started: u64,
    cfg: &'a Config,
    check_rows: usize,
    moe: Option<&'a MoeConfig<'a>>,
    attention: Option<&'a AttnConfig<'a>>,
    fused: Option<&'a FusedConfig<'a>>,
}

fn to_json(
    info: &RunInfo<'_>,
    rows: &[Row],
    moe_rows: &[MoeRow],
    attn_rows: &[AttnRow],
    fused_rows: &[FusedRow],
) -> String {
    let failed = rows.iter().filter(|r| !r.ok).count()
        + moe_rows.iter().filter(|r| !r.ok).count()
        + attn_rows.iter().filter(|r| !r.ok).count()
        + fused_rows.iter().filter(|r| !r.ok).count();
    let total = rows.len() + moe_rows.len() + attn_rows.len() + fused_rows.len();
    let mut s = String::from("{\n");
    s += &format!(
        "  \"tool\": \"dk bench\",\n  \"version\": {},\n",
        json_str(distill_kernels::VERSION)
    );
    s += &format!("  \"started_unix\": {},\n", info.started);
    s += &format!(
        "  \"device\": {},\n  \"backend\": {},\n",
        json_str(info.device),
        json_str(info.backend)
    );
    s += &format!(
        "  \"copy_gbps\": {},\n  \"copy_method\": {},\n",
        json_num(info.copy_bw / 1e9),
        json_str(info.copy_method)
    );
    s += &format!(
        "  \"l2_flush\": {},\n",
        info.l2_flush.map_or("null".into(), json_str)
    );
    s += &format!("  \"seed\": {},\n", info.seed);
    // What the numbers were measured with besides the defaults: the A/B switches set, and the
    // commit the caller names (DK_BENCH_COMMIT: gpu-check.sh passes its bundle's; no git here).
    let switches: Vec<String> = distill_kernels::switches::active()
        .iter()
        .map(|s| json_str(s))
        .collect();
    s += &format!("  \"switches\": [{}],\n", switches.join(", "));
    let commit = std::env::var("DK_BENCH_COMMIT")
        .ok()
        .filter(|c| !c.is_empty());
    s += &format!(
        "  \"commit\": {},\n",
        commit.as_deref().map_or("null".into(), json_str)
    );
    if info.cfg.divergence {
        // The divergence rows' settings (the other operations have their own objects below).
        s += &format!(
            "  \"divergence\": {{\"rows\": {}, \"iters\": {}, \"beta\": {}, \"temperature\": {}, \"reduction\": \"batchmean\", \"check_rows\": {}}},\n",
            info.n,
            info.iters,
            info.cfg.beta,
            info.cfg.temperature,
            info.check_rows.min(info.n)
        );
    }
    let mut ops = Vec::new();
    if info.cfg.divergence {
        ops.push("\"divergence\"");
    }
    if info.moe.is_some() {
        ops.push("\"moe\"");
    }
    if info.attention.is_some() {
        ops.push("\"attention\"");
    }
    if info.cfg.fused {
        ops.push("\"fused\"");
    }
    s += &format!("  \"ops\": [{}],\n", ops.join(", "));
    if let Some(m) = info.moe {
        s += &format!(
            "  \"moe\": {{\"tokens\": {}, \"iters\": {}, \"check_rows\": {}, \"shapes\": [{}], \"logits_dtype\": \"f32\"}},\n",
            m.tokens,
            m.iters,
            m.check_rows,
            json_strs(m.shapes.iter().map(|x| x.name()))
        );
    }
    s += &format!(
        "  \"passed\": {},\n  \"failed\": {},\n  \"ok\": {},\n  \"divergence_results\": [\n",
        total - failed,
        failed,
        failed == 0
    );
    for (i, r) in rows.iter().enumerate() {
        let (gt, lt) = tolerances(r.dtype);
        let ok_time = r.error.is_none();
        s += &format!(
            "    {{\"dtype\": {}, \"kind\": {}, \"n\": {}, \"v\": {}, \"pass\": {}, \"iters\": {}, \
             \"median_ms\": {}, \"min_ms\": {}, \"bytes\": {}, \"gbps\": {}, \"floor_fraction\": {}, \
             \"grad_rel_err\": {}, \"grad_rel_err_vs_unrounded\": {}, \"grad_abs_err\": {}, \"loss_rel_err\": {}, \"loss_abs_err\": {}, \
             \"grad_tol\": {gt}, \"loss_tol\": {lt}, \"ok\": {}, \"problems\": [{}], \"error\": {}}}{}\n",
            json_str(r.dtype.name()),
            json_str(r.kind.name()),
            r.n,
            r.v,
            json_str(r.pass.name()),
            r.iters,
            json_opt(ok_time.then_some(r.median_s * 1e3)),
            json_opt(ok_time.then_some(r.min_s * 1e3)),
            r.bytes,
            json_opt(ok_time.then(|| r.gbps())),
            json_opt(ok_time.then(|| r.gbps() * 1e9 / info.copy_bw)),
            json_opt(r.check.grad_rel),
            json_opt(r.check.grad_rel_exact),
            json_opt(r.check.grad_abs),
            json_opt(ok_time.then_some(r.check.loss_rel)),
            json_opt(ok_time.then_some(r.check.loss_abs)),
            r.ok,
            json_strs(&r.check.problems),
            r.error.as_deref().map_or("null".into(), json_str),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    s += "  ],\n";
    s += &format!(
        "  \"moe_results\": {},\n",
        moe::to_json(moe_rows, info.copy_bw)
    );
    if let Some(a) = info.attention {
        s += &format!(
            "  \"attention\": {{\"iters\": {}, \"check_rows\": {}, \"shapes\": [{}]}},\n",
            a.iters,
            a.check_rows,
            json_strs(a.shapes.iter().map(|x| x.name()))
        );
    }
    s += &format!(
        "  \"attention_results\": {},\n",
        attention::to_json(attn_rows, info.backend == "cuda")
    );
    if let Some(f) = info.fused {
        // The CPU checks every row of its small shape (and the weight gradient).
        let checked = if info.backend == "cuda" {
            f.check_rows.to_string()
        } else {
            "\"all\"".to_string()
        };
        s += &format!(
            "  \"fused\": {{\"iters\": {}, \"check_rows\": {}, \"kind\": \"jsd\", \"beta\": {}, \"temperature\": 1, \"shapes\": [{}]}},\n",
            f.iters,
            checked,
            f.beta,
            json_strs(f.shapes.iter().map(|x| x.name()))
        );
    }
    s += &format!("  \"fused_results\": {}\n}}\n", fused::to_json(fused_rows));
    s
}

/// Progress on stderr: rewritten in place on a terminal, one line each otherwise.
pub(crate) struct Progress {
    tty: bool,
    dirty: bool,
}

impl Progress {
    pub(crate) fn show(&mut self, msg: &str) {
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{msg}");
            self.dirty = true;
        } else {
            let _ = writeln!(e, "{msg}");
        }
        let _ = e.flush();
    }

    pub(crate) fn clear(&mut self) {
        if self.dirty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.dirty = false;
        }
    }
}

fn choose_runner(device: DeviceChoice) -> Result<Runner, String> {
    match device {
        DeviceChoice::Cpu => Ok(Runner::cpu()),
        DeviceChoice::Cuda(i) => {
            let ctx = Context::cuda(i).map_err(|e| format!("--device cuda:{i}: {e}"))?;
            Runner::cuda(ctx)
        }
        DeviceChoice::Auto => {
            if !cuda_driver_present() {
                eprintln!("note: no CUDA driver on this machine: running on the CPU");
                return Ok(Runner::cpu());
            }
            if cuda_device_count() == 0 {
                eprintln!("note: no CUDA device visible: running on the CPU");
                return Ok(Runner::cpu());
            }
            // Only a missing device falls back (as Context::best): a misspelt A/B switch or a
            // driver error must not quietly measure the CPU instead.
            match Context::cuda(0) {
                Ok(ctx) => Runner::cuda(ctx),
                Err(e) if e.kind() == ErrorKind::NoDevice => {
                    eprintln!("note: CUDA device 0 not usable ({e}): running on the CPU");
                    Ok(Runner::cpu())
                }
                Err(e) => Err(format!(
                    "CUDA device 0: {e} (pass --device cpu to run on the CPU)"
                )),
            }
        }
    }
}

/// `dk bench attention moe --quick` = `dk bench --ops attention,moe --quick`: leading bare
/// words are operations (and then `--ops` may not be given too).
fn ops_shorthand(args: &[String]) -> Result<Vec<String>, UsageError> {
    let words = args.iter().take_while(|a| !a.starts_with('-')).count();
    if words == 0 {
        return Ok(args.to_vec());
    }
    let rest = &args[words..];
    if rest.iter().any(|a| a == "--ops" || a.starts_with("--ops=")) {
        return Err(UsageError(format!(
            "operations given both as words ('{}') and with --ops",
            args[..words].join(" ")
        )));
    }
    let mut out = vec![format!("--ops={}", args[..words].join(","))];
    out.extend_from_slice(rest);
    Ok(out)
}

pub fn run(args: &[String]) -> i32 {
    let cfg = match ops_shorthand(args).and_then(|a| parse(&a)) {
        Ok(Some(c)) => c,
        Ok(None) => {
            out!("{HELP}");
            return 0;
        }
        Err(e) => {
            eprintln!("dk bench: error: {e}\n(see 'dk help bench')");
            return 2;
        }
    };
    if !cfg.divergence && !cfg.moe && !cfg.attention && !cfg.fused {
        eprintln!("dk bench: error: nothing to run (--ops)");
        return 2;
    }
    let mut runner = match choose_runner(cfg.device) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dk bench: error: {e}");
            return 1;
        }
    };
    let cuda = runner.is_cuda();
    let n = cfg.rows.unwrap_or(match (cuda, cfg.quick) {
        (true, false) => 4096,
        (true, true) => 1024,
        (false, false) => 8,
        (false, true) => 2,
    });
    let iters = cfg.iters.unwrap_or(match (cuda, cfg.quick) {
        (true, false) => 20,
        (true, true) => 5,
        (false, false) => 5,
        (false, true) => 1,
    });
    let tokens = cfg.tokens.unwrap_or(match (cuda, cfg.quick) {
        (true, false) => 16384,
        (true, true) => 2048,
        (false, false) => 2048,
        (false, true) => 256,
    });
    let check_rows = cfg.check_rows.unwrap_or(8);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let seed = cfg.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        mix(&[nanos, std::process::id() as u64]) % 1_000_000_007
    });
    let moe_cfg = MoeConfig {
        shapes: &cfg.moe_shapes,
        dtypes: &cfg.dtypes,
        tokens,
        iters,
        check_rows: cfg.check_rows.unwrap_or(64),
        seed,
    };
    let attn_shapes = cfg.attn_shapes.clone().unwrap_or_else(|| {
        if cuda {
            CUDA_ATTN_SHAPES.to_vec()
        } else {
            CPU_ATTN_SHAPES.to_vec()
        }
    });
    let attn_cfg = AttnConfig {
        shapes: &attn_shapes,
        dtypes: &cfg.dtypes,
        iters,
        check_rows,
        seed,
    };
    let fused_shapes = if cuda {
        CUDA_FUSED_SHAPES.to_vec()
    } else {
        CPU_FUSED_SHAPES.to_vec()
    };
    let fused_cfg = FusedConfig {
        shapes: &fused_shapes,
        dtypes: &cfg.dtypes,
        iters: iters.min(10),
        check_rows: cfg.check_rows.unwrap_or(4),
        seed,
        beta: cfg.beta,
    };
    let device = runner.describe();
    let t_start = Instant::now();

    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        dirty: false,
    };
    progress.show("measuring copy bandwidth ...");
    let (copy_bw, copy_method) = match runner.copy_bandwidth() {
        Ok(x) => x,
        Err(e) => {
            progress.clear();
            eprintln!("dk bench: error: {e}");
            return 1;
        }
    };
    progress.clear();
    outln!("dk bench {} on {device}", distill_kernels::VERSION);
    outln!(
        "copy bandwidth {:.1} GB/s ({copy_method}; bytes read + written), seed {seed}",
        copy_bw / 1e9
    );
    if !cuda {
        outln!("note: the CPU backend is the exact f64 reference; its times say nothing about the GPU kernels");
    }
    let l2_flush = runner.flush_method();
    if let Some(flush) = &l2_flush {
        if cfg.moe || cfg.attention || cfg.fused {
            outln!("L2 flush before each timed MoE / attention / fused run: {flush}");
        }
    }

    let div_total = if cfg.divergence {
        cfg.dtypes.len() * cfg.vocabs.len() * cfg.kinds.len() * cfg.passes.len()
    } else {
        0
    };
    let total = div_total
        + if cfg.moe { moe::count(&moe_cfg) } else { 0 }
        + if cfg.attention {
            attention::count(&attn_cfg, cuda)
        } else {
            0
        }
        + if cfg.fused {
            fused::count(&fused_cfg, cuda)
        } else {
            0
        };
    if total == 0 {
        // Every requested dtype was dropped (f32 attention / fused on CUDA): nothing measured
        // must not read as a pass.
        eprintln!(
            "dk bench: error: nothing to run on this device: the CUDA attention and fused \
             kernels take bf16 / f16 (--dtype)\n(see 'dk help bench')"
        );
        return 2;
    }
    let mut done = 0;
    let mut rows: Vec<Row> = Vec::with_capacity(div_total);
    if cfg.divergence {
        outln!();
        outln!(
            "divergence: rows {n}, median of {iters} timed run(s) after a checked one, beta {}, T {}, batchmean, {} rows checked per result",
            cfg.beta,
            cfg.temperature,
            check_rows.min(n)
        );
        outln!(
            "floor = bytes / copy bandwidth; bytes = 3*N*V*size (fwd+bwd: read s, t, write grad), 2*N*V*size (fwd)"
        );
        outln!(
            "grad rel = ||g - r|| / ||ref||, r = f64 reference rounded to the dtype; loss rel = max over checked rows and the reduced loss"
        );
        outln!();
        outln!("{HEADER}");
        let _ = std::io::stdout().flush();
        let div = DivergenceRun {
            n,
            iters,
            seed,
            check_rows,
            copy_bw,
            total,
        };
        rows = run_divergence(&mut runner, &cfg, &div, &mut progress, &mut done);
    }
    let mut moe_rows: Vec<MoeRow> = Vec::new();
    if cfg.moe {
        outln!();
        moe::print_header(&moe_cfg, cuda);
        let _ = std::io::stdout().flush();
        moe_rows = moe::run(&runner, &moe_cfg, copy_bw, &mut progress, &mut done, total);
    }
    let mut attn_rows: Vec<AttnRow> = Vec::new();
    if cfg.attention {
        outln!();
        attention::print_header(&attn_cfg, cuda);
        let _ = std::io::stdout().flush();
        attn_rows = attention::run(&runner, &attn_cfg, &mut progress, &mut done, total);
    }
    let mut fused_rows: Vec<FusedRow> = Vec::new();
    if cfg.fused {
        outln!();
        fused::print_header(&fused_cfg, cuda);
        let _ = std::io::stdout().flush();
        fused_rows = fused::run(&runner, &fused_cfg, &mut progress, &mut done, total);
    }
    progress.clear();

    let failed = rows.iter().filter(|r| !r.ok).count()
        + moe_rows.iter().filter(|r| !r.ok).count()
        + attn_rows.iter().filter(|r| !r.ok).count()
        + fused_rows.iter().filter(|r| !r.ok).count();
    let results = rows.len() + moe_rows.len() + attn_rows.len() + fused_rows.len();
    if let Some(path) = &cfg.json {
        let info = RunInfo {
            device: &device,
            backend: if cuda { "cuda" } else { "cpu" },
            copy_bw,
            copy_method: &copy_method,
            l2_flush: l2_flush.as_deref(),
            n,
            iters,
            seed,
            started,
            cfg: &cfg,
            check_rows,
            moe: cfg.moe.then_some(&moe_cfg),
            attention: cfg.attention.then_some(&attn_cfg),
            fused: cfg.fused.then_some(&fused_cfg),
        };
        if let Err(e) = std::fs::write(
            path,
            to_json(&info, &rows, &moe_rows, &attn_rows, &fused_rows),
        ) {
            eprintln!("dk bench: error: cannot write {}: {e}", path.display());
            return 1;
        }
    }
    let best = rows
        .iter()
        .filter(|r| r.ok && r.pass == Pass::FwdBwd)
        .max_by(|a, b| a.gbps().total_cmp(&b.gbps()));
    // On the CPU the backend is the f64 reference: its fraction of the floor is no performance
    // figure, and printing one in the last line invites reading it as such.
    let best_txt = best.filter(|_| cuda).map_or(String::new(), |r| {
        format!(
            "; best fwd+bwd {} of floor ({} {} {}x{})",
            pct(r.gbps() * 1e9 / copy_bw),
            r.dtype.name(),
            r.kind.name(),
            r.n,
            r.v
        )
    });
    let mut parts = Vec::new();
    if cfg.divergence {
        parts.push(format!("{} divergence", rows.len()));
    }
    if cfg.moe {
        parts.push(format!("{} MoE", moe_rows.len()));
    }
    if cfg.attention {
        parts.push(format!("{} attention", attn_rows.len()));
    }
    if cfg.fused {
        parts.push(format!("{} fused", fused_rows.len()));
    }
    let split = format!(" ({})", parts.join(", "));
    outln!();
    let switches = distill_kernels::switches::active();
    if !switches.is_empty() {
        // What this run measured besides the defaults (README, "A/B switches").
        outln!("A/B switches: {}", switches.join(" "));
    }
    if let Err(e) = distill_kernels::switches::check() {
        // Harmless on the CPU, fatal for a CUDA context: say so on any backend.
        outln!("note: {e} (a CUDA context refuses to open with it)");
    }
    let shapes = distill_kernels::divergence::cluster_launch_shapes();
    if !shapes.is_empty() {
        // Which Hopper cluster kernels served the divergence rows (the rest: one block per row).
        outln!("divergence cluster launches: {}", shapes.join("; "));
    }
    let attn = distill_kernels::attention::kernels_used();
    if !attn.is_empty() {
        // Which forward and backward kernels served attention (the A/B switches DK_ATTENTION_FWD /
        // DK_ATTENTION_BWD pick the family: wgmma by default on Hopper).
        outln!("attention kernels: {}", attn.join(", "));
    }
    if let Some(why) = distill_kernels::divergence::cluster_fallback_reason() {
        // The results are right, but some rows ran the one-block kernel: say so by the numbers.
        outln!("note: the divergence cluster kernel fell back: {why}");
    }
    if failed == 0 {
        outln!(
            "dk bench: all {results} results{split} passed on {device}{best_txt}; copy {:.1} GB/s; {:.1} s",
            copy_bw / 1e9,
            t_start.elapsed().as_secs_f64()
        );
        0
    } else {
        outln!(
            "dk bench: FAILED {failed} of {results} results{split} on {device}{best_txt}; copy {:.1} GB/s; {:.1} s",
            copy_bw / 1e9,
            t_start.elapsed().as_secs_f64()
        );
        1
    }
}

/// The divergence section's settings.
struct DivergenceRun {
    n: usize,
    iters: usize,
    seed: u64,
    check_rows: usize,
    copy_bw: f64,
    /// Results of the whole run (for the progress line).
    total: usize,
}

/// The divergence rows: every dtype × vocabulary × kind × pass, printed as they complete.
fn run_divergence(
    runner: &mut Runner,
    cfg: &Config,
    d: &DivergenceRun,
    progress: &mut Progress,
    done: &mut usize,
) -> Vec<Row> {
    let (n, iters, total) = (d.n, d.iters, d.total);
    let mut rows: Vec<Row> = Vec::new();
    for &dtype in &cfg.dtypes {
        for &v in &cfg.vocabs {
            let samples = sample_rows(n, d.check_rows, mix(&[d.seed, v as u64]));
            progress.show(&format!(
                "[{}/{total}] {} {n}x{v}: generating inputs ...",
                *done + 1,
                dtype.name()
            ));
            let in_place = cfg.passes.contains(&Pass::InPlace);
            let loaded = runner.load(dtype, n, v, d.seed, &samples, in_place);
            for &kind in &cfg.kinds {
                let params = Params {
                    kind,
                    beta: cfg.beta,
                    temperature: cfg.temperature,
                    ..Params::default()
                };
                let mut refs: Option<Vec<RefRow>> = None;
                for &pass in &cfg.passes {
                    *done += 1;
                    progress.show(&format!(
                        "[{done}/{total}] {} {} {n}x{v} {} ...",
                        dtype.name(),
                        kind.name(),
                        pass.name()
                    ));
                    let with_grad = pass != Pass::Fwd;
                    let bytes = ((if with_grad { 3 } else { 2 }) * n * v * dtype.size()) as f64;
                    let mut row = Row {
                        dtype,
                        kind,
                        n,
                        v,
                        pass,
                        iters,
                        median_s: f64::NAN,
                        min_s: f64::NAN,
                        bytes,
                        check: Check::default(),
                        error: None,
                        ok: false,
                    };
                    let result = match &loaded {
                        Err(e) => Err(e.clone()),
                        Ok(_) => {
                            runner.run(&params, with_grad, pass == Pass::InPlace, iters, &samples)
                        }
                    };
                    match result {
                        Err(e) => row.error = Some(e),
                        Ok(out) => {
                            let inputs = loaded.as_ref().expect("loaded when the run succeeded");
                            let refs = refs.get_or_insert_with(|| reference(&params, inputs));
                            row.median_s = median(&out.times);
                            row.min_s = out.times.iter().copied().fold(f64::INFINITY, f64::min);
                            row.check = check(
                                &out,
                                refs,
                                &samples,
                                dtype,
                                1.0 / n as f64,
                                1.0 / cfg.temperature as f64,
                                with_grad,
                            );
                            let (gt, lt) = tolerances(dtype);
                            row.ok = row.check.problems.is_empty()
                                && row.check.loss_rel <= lt
                                && row.check.grad_rel.map_or(true, |g| g <= gt);
                        }
                    }
                    progress.clear();
                    outln!("{}", format_row(&row, d.copy_bw));
                    let _ = std::io::stdout().flush();
                    rows.push(row);
                }
            }
            runner.unload();
        }
    }
    progress.clear();
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn json_has_each_operations_settings_only_when_it_ran() {
        let fused_cfg = FusedConfig {
            shapes: &CPU_FUSED_SHAPES,
            dtypes: &[DType::F32],
            iters: 2,
            check_rows: 3,
            seed: 1,
            beta: 0.3,
        };
        let json_for = |ops: &[&str]| {
            let cfg = parse(&args(ops)).unwrap().unwrap();
            let info = RunInfo {
                device: "test",
                backend: "cpu",
                copy_bw: 1e9,
                copy_method: "test",
                l2_flush: None,
                n: 7,
                iters: 3,
                seed: 11,
                started: 0,
                cfg: &cfg,
                check_rows: 5,
                moe: None,
                attention: None,
                fused: cfg.fused.then_some(&fused_cfg),
            };
            to_json(&info, &[], &[], &[], &[])
        };
        let div = json_for(&["--ops", "divergence"]);
        assert!(
            div.contains("\"divergence\": {\"rows\": 7, \"iters\": 3,")
                && div.contains("\"check_rows\": 5}")
                && div.contains("\"seed\": 11,"),
            "{div}"
        );
        let moe = json_for(&["--ops", "moe"]);
        assert!(!moe.contains("\"divergence\":"), "{moe}");
        assert!(!moe.contains("\"beta\""), "{moe}");
        assert!(moe.contains("\"divergence_results\": [") && moe.contains("\"seed\": 11,"));
        assert!(!moe.contains("\"fused\":"), "{moe}");
        // The fused rows' settings (--beta is theirs too) in their own object; on the CPU
        // (this RunInfo's backend) every row is checked, whatever --check-rows asked.
        let fused = json_for(&["--ops", "fused", "--beta", "0.3"]);
        assert!(
            fused.contains(
                "\"fused\": {\"iters\": 2, \"check_rows\": \"all\", \"kind\": \"jsd\", \"beta\": 0.3,"
            ),
            "{fused}"
        );
        assert!(!fused.contains("\"divergence\":"), "{fused}");
    }

    #[test]
    fn parses_lists_and_defaults() {
        let c = parse(&args(&[
            "--kinds",
            "jsd,forward_kl",
            "--dtype=f32,bf16",
            "--vocab",
            "1000",
            "--device",
            "cuda:1",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.kinds, vec![Kind::Jsd, Kind::ForwardKl]);
        assert_eq!(c.dtypes, vec![DType::F32, DType::BF16]);
        assert_eq!(c.vocabs, vec![1000]);
        assert_eq!(c.device, DeviceChoice::Cuda(1));
        assert!(c.divergence && c.moe);
        assert_eq!(c.moe_shapes, ALL_SHAPES.to_vec());
        assert!(parse(&args(&["--help"])).unwrap().is_none());
        let c = parse(&args(&[
            "--ops",
            "moe",
            "--moe-shapes",
            "qwen3,scout",
            "--tokens=512",
            "--check-rows",
            "3",
        ]))
        .unwrap()
        .unwrap();
        assert!(!c.divergence && c.moe);
        assert_eq!(c.moe_shapes, vec![Shape::Qwen3, Shape::Scout]);
        assert_eq!((c.tokens, c.check_rows), (Some(512), Some(3)));
        let c = parse(&args(&["--ops", "divergence"])).unwrap().unwrap();
        assert!(c.divergence && !c.moe && !c.attention);
        let c =
            parse(&ops_shorthand(&args(&["attention", "--attn-shapes", "small,llama4"])).unwrap())
                .unwrap()
                .unwrap();
        assert!(!c.divergence && !c.moe && c.attention);
        assert_eq!(
            c.attn_shapes,
            Some(vec![AttnShape::Small, AttnShape::Llama4])
        );
        let c = parse(&args(&["--passes", "fwd, in-place"]))
            .unwrap()
            .unwrap();
        assert_eq!(c.passes, vec![Pass::Fwd, Pass::InPlace]); // spaces trimmed, as --kinds
    }

    #[test]
    fn losses_below_f32_range_are_compared_absolutely() {
        // At T = 0.01 a row's loss can be 1e-180: the f32 result 0 is right, not 100 % off.
        assert_eq!(rel(2.3e-180, 2.3e-180), 2.3e-180);
        assert_eq!(rel(1e-9, 0.0), 1e-9);
        assert_eq!(rel(0.5, 2.0), 0.25);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            &["--kinds", "kl"][..],
            &["--dtype", "f64"],
            &["--rows", "0"],
            &["--beta", "2"],
            &["--temperature", "0"],
            &["--device", "tpu"],
            &["--vocab", "0"],
            &["--ops", "mamba"],
            &["--attn-shapes", "gpt2"],
            &["--moe-shapes", "mixtral"],
            &["--tokens", "0"],
            &["--frobnicate"],
            &["--rows", "8", "--rows", "16"],
            // --kind is --kinds spelt otherwise: together they are a repeat, not "last wins".
            &["--kinds", "jsd", "--kind", "forward_kl"],
            // Options for rows the run leaves out would be ignored: refused instead.
            &["--ops", "moe", "--vocab", "1000"],
            &["--ops", "attention", "--tokens", "64"],
            &["--ops", "divergence", "--attn-shapes", "small"],
            &["--ops", "fused", "--temperature", "2"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
        let c = parse(&args(&["--kind", "reverse_kl"])).unwrap().unwrap();
        assert_eq!(c.kinds, vec![Kind::ReverseKl]);
        let c = parse(&args(&["--ops", "fused", "--beta", "0.3"]))
            .unwrap()
            .unwrap();
        assert_eq!(c.beta, 0.3); // beta is the fused JSD's too
    }

    #[test]
    fn check_catches_unwritten_and_wrong_values() {
        let refs = vec![RefRow {
            loss: 1.0,
            grad: vec![0.5, -0.5],
        }];
        let good = Outputs {
            times: vec![1.0],
            loss: 0.5,
            per_token: vec![1.0, 0.0],
            grad_rows: vec![vec![0.25, -0.25]],
        };
        // two rows, row 0 sampled; scale 1/2.
        let c = check(&good, &refs, &[0], DType::F32, 0.5, 1.0, true);
        assert!(c.problems.is_empty());
        assert!(c.grad_rel.unwrap() < 1e-12 && c.loss_rel < 1e-12);
        let nan = Outputs {
            grad_rows: vec![vec![f64::NAN, -0.25]],
            ..good
        };
        let c = check(&nan, &refs, &[0], DType::F32, 0.5, 1.0, true);
        assert!(!c.problems.is_empty());
        assert!(c.grad_rel.unwrap().is_nan());
    }
}
