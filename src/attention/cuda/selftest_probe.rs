//! What to do when the wgmma self-test fails on a card: instead of one error figure, say which
//! reading of the shared-memory layouts the card has. Two tools, both cheap relaunches of the
//! self-test kernels (`cuda/attention_wgmma_selftest.cu`, which take the descriptors' byte
//! offsets as arguments):
//!
//! - **Probes** map an operand: one operand holds one-hot rows, the other the row (or column)
//!   index of each element plus one, so every output element is the index of the element the
//!   card actually read for one logical position. Integers up to 256 are exact in bf16 and a
//!   single product of 1 and an integer is exact in f32, so a probe's output decodes exactly.
//! - **The sweep** relaunches a product over a grid of (LBO, SBO) pairs and lists the pairs
//!   that give the right product.
//!
//! A probe of the ss kernel cannot tell a permutation of k that the card applies to both K-major
//! operands alike: the one-hot operand's selection moves with it. Such a misreading is harmless
//! (every product of two K-major operands sums over the same k), and the rs probe, whose
//! one-hot operand comes from registers, maps its operand independently.
//!
//! Both run in the unit test's failure path only (`wgmma_layouts_on_the_device`), and on the
//! host emulator in `tests/attention_kernel_sim.rs`, which checks that they report the
//! emulator's own reading.

/// Byte offsets tried for LBO and SBO by the sweep (each pair of them): the multiples of 16
/// from one 16-byte chunk to one 64 × 64 half-tile of 16-bit elements, in powers of two.
pub const WGMMA_SWEEP_OFFSETS: [u32; 10] = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];

/// Dynamic shared memory of a sweep launch: more than any of the sweep's offsets can make a
/// product read (the tiles occupy the first 33 KiB; an 8-row group 7 strides of 8192 bytes away,
/// a 64-column half one LBO away, and another reading of LBO as the stride of each of 16
/// column groups, stay below 200 KiB), so a wrong pair reads stale shared memory instead of
/// faulting. 227 KiB is the opt-in limit of compute capability 9.0.
pub const WGMMA_SWEEP_SMEM_BYTES: u32 = 227 * 1024;

/// Which logical matrix a probe maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaOperand {
    /// A of the ss product (64 × 128, K-major in shared memory).
    SsA,
    /// B of the ss product (64 × 128 as stored: the Kᵀ side, K-major).
    SsB,
    /// V of the rs product (64 × 128, MN-major).
    RsV,
}

impl WgmmaOperand {
    fn name(self) -> &'static str {
        match self {
            WgmmaOperand::SsA => "ss operand A (K-major, as Q)",
            WgmmaOperand::SsB => "ss operand B (K-major, as K)",
            WgmmaOperand::RsV => "rs operand V (MN-major, as V)",
        }
    }
}

/// One probe launch: the inputs of the ss kernel (`left` = a, `right` = b, both 64 × 128) or of
/// the rs kernel (`left` = p, 64 × 64; `right` = v, 64 × 128), row-major, and how its output
/// decodes.
#[derive(Clone, Debug)]
pub struct WgmmaProbe {
    /// The matrix this probe maps.
    pub operand: WgmmaOperand,
    /// For ss: which 64-column half of the k index the one-hot operand selects.
    pub half: usize,
    /// Whether the mapped operand holds column indices (else row indices), plus one.
    pub encodes_column: bool,
    /// a (ss) or p (rs).
    pub left: Vec<f32>,
    /// b (ss) or v (rs).
    pub right: Vec<f32>,
}

/// The probes of the ss kernel (`rs = false`: A and B, both halves of k, row and column
/// indices: 8 launches) or of the rs kernel (V, row and column indices: 2 launches).
pub fn wgmma_probes(rs: bool) -> Vec<WgmmaProbe> {
    let code =
        |encodes_column: bool, r: usize, c: usize| (if encodes_column { c } else { r } + 1) as f32;
    let mut probes = Vec::new();
    if rs {
        for encodes_column in [false, true] {
            // C[i][n] = Σ_k P[i][k] V'[k][n] with P = I: the V element read for (i, n).
            let left = (0..64 * 64)
                .map(|ik| f32::from(u8::from(ik / 64 == ik % 64)))
                .collect();
            let right = (0..64 * 128)
                .map(|kn| code(encodes_column, kn / 128, kn % 128))
                .collect();
            probes.push(WgmmaProbe {
                operand: WgmmaOperand::RsV,
                half: 0,
                encodes_column,
                left,
                right,
            });
        }
        return probes;
    }
    for operand in [WgmmaOperand::SsA, WgmmaOperand::SsB] {
        for half in 0..2 {
            for encodes_column in [false, true] {
                // One-hot rows select k = row + 64·half: C[i][j] = B'[j][i + 64 half] when A is
                // one-hot, A'[i][j + 64 half] when B is.
                let one_hot: Vec<f32> = (0..64 * 128)
                    .map(|rk| f32::from(u8::from(rk % 128 == rk / 128 + 64 * half)))
                    .collect();
                let coded: Vec<f32> = (0..64 * 128)
                    .map(|rk| code(encodes_column, rk / 128, rk % 128))
                    .collect();
                let (left, right) = match operand {
                    WgmmaOperand::SsA => (coded, one_hot),
                    _ => (one_hot, coded),
                };
                probes.push(WgmmaProbe {
                    operand,
                    half,
                    encodes_column,
                    left,
                    right,
                });
            }
        }
    }
    probes
}

/// An output element of a probe as an index: `Some(v − 1)` for an integer v in 1 ..= 128,
/// `None` for anything else (zeros, stale shared memory, a sum of several elements).
fn index_of(x: f32) -> Option<u32> {
    (x.fract() == 0.0 && (1.0..=128.0).contains(&x)).then(|| x as u32 - 1)
}

/// For each probed operand, the elements the card read from a place other than the layout we
/// assume: "(row, col) ← (row', col')" with "?" where a probe's output is no single element.
/// `outputs[i]` is the output of `probes[i]` (64 × 64 for ss, 64 × 128 for rs, row-major).
///
/// # Panics
/// If `outputs` does not hold one output per probe.
pub fn wgmma_map_report(probes: &[WgmmaProbe], outputs: &[Vec<f32>]) -> String {
    assert_eq!(probes.len(), outputs.len(), "one output per probe");
    let mut lines = Vec::new();
    for operand in [WgmmaOperand::SsA, WgmmaOperand::SsB, WgmmaOperand::RsV] {
        // The logical operand is 64 × 128; per element the decoded (row, column).
        let mut got = vec![(None, None); 64 * 128];
        let mut seen = false;
        for (probe, out) in probes
            .iter()
            .zip(outputs)
            .filter(|(p, _)| p.operand == operand)
        {
            seen = true;
            let cols = if operand == WgmmaOperand::RsV {
                128
            } else {
                64
            };
            assert_eq!(out.len(), 64 * cols, "probe output size");
            for (at, &x) in out.iter().enumerate() {
                let (i, j) = (at / cols, at % cols);
                let (r, c) = match operand {
                    WgmmaOperand::SsA => (i, j + 64 * probe.half),
                    WgmmaOperand::SsB => (j, i + 64 * probe.half),
                    WgmmaOperand::RsV => (i, j),
                };
                let slot = &mut got[r * 128 + c];
                if probe.encodes_column {
                    slot.1 = index_of(x);
                } else {
                    slot.0 = index_of(x);
                }
            }
        }
        if !seen {
            continue;
        }
        let show = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
        let wrong: Vec<String> = got
            .iter()
            .enumerate()
            .filter(|(rc, &(r, c))| (r, c) != (Some((rc / 128) as u32), Some((rc % 128) as u32)))
            .map(|(rc, &(r, c))| {
                format!("({}, {}) ← ({}, {})", rc / 128, rc % 128, show(r), show(c))
            })
            .collect();
        if wrong.is_empty() {
            lines.push(format!(
                "{}: every element read where we place it",
                operand.name()
            ));
        } else {
            lines.push(format!(
                "{}: {} of 8192 elements read from elsewhere, as (row, col) ← (row, col) of the \
                 matrix as written, \"?\" = no single element; the first {}: {}",
                operand.name(),
                wrong.len(),
                wrong.len().min(24),
                wrong[..wrong.len().min(24)].join(", ")
            ));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a kernel computes from a probe when the card reads operand elements through
    /// `read(r, c) -> (r', c')` (the same misreading for every matrix of the form), in f64.
    fn simulate(probe: &WgmmaProbe, read: impl Fn(usize, usize) -> (usize, usize)) -> Vec<f32> {
        let at = |m: &[f32], cols: usize, r: usize, c: usize| {
            let (r, c) = read(r, c);
            m[r * cols + c] as f64
        };
        match probe.operand {
            WgmmaOperand::RsV => (0..64 * 128)
                .map(|in_| {
                    let (i, n) = (in_ / 128, in_ % 128);
                    (0..64)
                        .map(|k| probe.left[i * 64 + k] as f64 * at(&probe.right, 128, k, n))
                        .sum::<f64>() as f32
                })
                .collect(),
            _ => (0..64 * 64)
                .map(|ij| {
                    let (i, j) = (ij / 64, ij % 64);
                    (0..128)
                        .map(|k| at(&probe.left, 128, i, k) * at(&probe.right, 128, j, k))
                        .sum::<f64>() as f32
                })
                .collect(),
        }
    }

    fn all_as_written(report: &str) -> bool {
        report
            .lines()
            .all(|l| l.ends_with("every element read where we place it"))
    }

    #[test]
    fn probes_decode_the_layout_they_were_run_under() {
        for rs in [false, true] {
            let probes = wgmma_probes(rs);
            assert_eq!(probes.len(), if rs { 2 } else { 8 });
            // Read as written: nothing reported.
            let outputs: Vec<_> = probes.iter().map(|p| simulate(p, |r, c| (r, c))).collect();
            let report = wgmma_map_report(&probes, &outputs);
            assert_eq!(report.lines().count(), if rs { 1 } else { 2 }, "{report}");
            assert!(all_as_written(&report), "{report}");
            // The 64-column halves of k swapped (an LBO misread): rs names every element of V.
            // In ss both operands are misread alike, so the one-hot operand selects the swapped
            // column too and the map reads as written: a k-permutation common to A and B leaves
            // every product of two K-major operands unchanged, so there is nothing to report.
            let outputs: Vec<_> = probes
                .iter()
                .map(|p| simulate(p, |r, c| (r, c ^ 64)))
                .collect();
            let report = wgmma_map_report(&probes, &outputs);
            if rs {
                assert!(
                    report.contains("8192 of 8192 elements read from elsewhere"),
                    "{report}"
                );
                assert!(report.contains("(0, 0) ← (0, 64)"), "{report}");
            } else {
                assert!(all_as_written(&report), "{report}");
            }
            // Rows 8..15 read from rows 0..7 (an SBO misread). rs: 1/8 of V. ss: the one-hot
            // operand's rows are misread too, so its selected k moves with them: elements
            // whose row or k (mod 64) is in 8..15 show, 8192 − 56 · 112 of them.
            let outputs: Vec<_> = probes
                .iter()
                .map(|p| simulate(p, |r, c| (if r / 8 == 1 { r - 8 } else { r }, c)))
                .collect();
            let report = wgmma_map_report(&probes, &outputs);
            let count = if rs { 1024 } else { 8192 - 56 * 112 };
            assert!(
                report.contains(&format!("{count} of 8192 elements")),
                "{report}"
            );
            let first = if rs {
                "(8, 0) ← (0, 0)"
            } else {
                "(0, 8) ← (0, 0)"
            };
            assert!(report.contains(first), "{report}");
        }
    }

    #[test]
    fn a_probe_output_that_is_no_single_element_shows_as_unknown() {
        assert_eq!(index_of(0.0), None);
        assert_eq!(index_of(129.0), None);
        assert_eq!(index_of(2.5), None);
        assert_eq!(index_of(f32::NAN), None);
        assert_eq!(index_of(1.0), Some(0));
        assert_eq!(index_of(128.0), Some(127));
        let probes = wgmma_probes(true);
        let outputs = vec![vec![0.0; 64 * 128]; 2];
        let report = wgmma_map_report(&probes, &outputs);
        assert!(report.contains("(0, 0) ← (?, ?)"), "{report}");
    }
}
