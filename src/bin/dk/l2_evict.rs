//! The L2 flush before each timed CUDA run: a read pass over a 256 MiB buffer.
//!
//! A memset alone evicts the benchmark's data but leaves up to an L2's worth (50 MB on H100 and
//! H200) of dirty lines, and their write-back then happens inside the next timed run (up to
//! ~12 µs at the copy rate: a real share of a 30 µs route or an 80 µs combine). Reading a buffer
//! larger than the L2 evicts everything before it (dirty lines are written back during the
//! read, outside the events) and leaves clean lines only. `python/bench.py` flushes the same way (a memset
//! then a read).
//!
//! The kernel is PTX text, assembled by the driver when the runner starts, so that `dk` needs
//! no kernel of its own in the library's fatbin and no NVRTC. It is what `nvcc -ptx` gives for
//!
//! ```text
//! extern "C" __global__ void __launch_bounds__(256)
//! dk_bench_l2_evict(const uint4* src, unsigned long long words, unsigned* sink) {
//!   unsigned acc = 0;
//!   for (unsigned long long i = blockIdx.x * 256ull + threadIdx.x; i < words;
//!        i += gridDim.x * 256ull) {
//!     const uint4 w = __ldcg(src + i);  // 16-byte loads cached in L2 only
//!     acc ^= w.x ^ w.y ^ w.z ^ w.w;
//!   }
//!   if (acc == 0x5A17C0DEu) *sink = acc;  // never true on the zeroed buffer; keeps the loads
//! }
//! ```
//!
//! with `.version` lowered to 7.0 (CUDA 11.0 drivers) and the comments trimmed. A unit test
//! assembles it with `ptxas` for every architecture the library compiles, where one is found.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

/// The flush kernel's entry point.
const ENTRY: &str = "dk_bench_l2_evict";

/// Threads per block (the kernel's `.maxntid`).
const THREADS: u32 = 256;

/// The kernel (see the module's documentation for its source).
pub const PTX: &str = r#"
.version 7.0
.target sm_80
.address_size 64

.visible .entry dk_bench_l2_evict(
	.param .u64 dk_bench_l2_evict_param_0,
	.param .u64 dk_bench_l2_evict_param_1,
	.param .u64 dk_bench_l2_evict_param_2
)
.maxntid 256, 1, 1
{
	.reg .pred 	%p<4>;
	.reg .b32 	%r<16>;
	.reg .b64 	%rd<14>;

	ld.param.u64 	%rd6, [dk_bench_l2_evict_param_0];
	ld.param.u64 	%rd7, [dk_bench_l2_evict_param_1];
	ld.param.u64 	%rd8, [dk_bench_l2_evict_param_2];
	mov.u32 	%r3, %ctaid.x;
	mul.wide.u32 	%rd9, %r3, 256;
	mov.u32 	%r4, %tid.x;
	cvt.u64.u32 	%rd10, %r4;
	add.s64 	%rd13, %rd9, %rd10;
	setp.ge.u64 	%p1, %rd13, %rd7;
	@%p1 bra 	$L__BB0_5;

	mov.u32 	%r6, %nctaid.x;
	mul.wide.u32 	%rd2, %r6, 256;
	cvta.to.global.u64 	%rd3, %rd8;
	mov.u32 	%r15, 0;

$L__BB0_2:
	shl.b64 	%rd12, %rd13, 4;
	add.s64 	%rd11, %rd6, %rd12;
	ld.global.cg.v4.u32 {%r7,%r8,%r9,%r10}, [%rd11];
	xor.b32  	%r11, %r8, %r15;
	xor.b32  	%r12, %r11, %r7;
	xor.b32  	%r13, %r12, %r9;
	xor.b32  	%r15, %r13, %r10;
	add.s64 	%rd13, %rd13, %rd2;
	setp.lt.u64 	%p2, %rd13, %rd7;
	@%p2 bra 	$L__BB0_2;

	setp.ne.s32 	%p3, %r15, 1511506142;
	@%p3 bra 	$L__BB0_5;

	mov.u32 	%r14, 1511506142;
	st.global.u32 	[%rd3], %r14;

$L__BB0_5:
	ret;

}
"#;

/// The loaded flush kernel (cheap to clone: the module is reference-counted).
#[derive(Clone)]
pub struct L2Evict {
    function: CudaFunction,
    blocks: u32,
}

impl L2Evict {
    /// Loads the kernel into `stream`'s context (the driver assembles the PTX); `sms` sizes the
    /// grid (eight blocks per multiprocessor).
    pub fn load(stream: &Arc<CudaStream>, sms: usize) -> Result<Self, String> {
        let module = stream
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_src(PTX))
            .map_err(|e| format!("cuModuleLoadData (L2 flush kernel): {e:?}"))?;
        let function = module
            .load_function(ENTRY)
            .map_err(|e| format!("cuModuleGetFunction ({ENTRY}): {e:?}"))?;
        let blocks = (8 * sms.clamp(1, 1 << 20)) as u32;
        Ok(L2Evict { function, blocks })
    }

    /// Queues one read pass over `buffer` (its whole 16-byte words) on `stream`. The buffer
    /// should hold zeros: the kernel writes its first word only if the words' xor is a value
    /// that zeros never give (the store keeps the loads from being optimised away).
    pub fn launch(&self, stream: &Arc<CudaStream>, buffer: &CudaSlice<u8>) -> Result<(), String> {
        let words = (buffer.len() / 16) as u64;
        let cfg = LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&self.function);
        launch.arg(buffer).arg(&words).arg(buffer);
        // SAFETY: the kernel's parameters are (const uint4* src, u64 words, u32* sink): `buffer`
        // holds `words` 16-byte words (cudarc's allocations are 256-byte aligned) and at least
        // one u32 when `words` > 0 (with none the kernel reads and writes nothing); it outlives
        // the launch, which is ordered on `stream` after the work that wrote it.
        unsafe { launch.launch(cfg) }
            .map(|_| ())
            .map_err(|e| format!("cuLaunchKernel ({ENTRY}): {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::PTX;
    use std::path::PathBuf;
    use std::process::Command;

    /// `ptxas` beside `$NVCC`, under `$CUDA_HOME/bin`, or on `PATH`.
    fn ptxas() -> Option<PathBuf> {
        let beside_nvcc = std::env::var_os("NVCC")
            .map(PathBuf::from)
            .and_then(|p| p.parent().map(|d| d.join("ptxas")));
        let in_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/ptxas"));
        beside_nvcc
            .into_iter()
            .chain(in_home)
            .find(|p| p.is_file())
            .or_else(|| {
                Command::new("ptxas")
                    .arg("--version")
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|_| PathBuf::from("ptxas"))
            })
    }

    #[test]
    fn the_flush_kernel_assembles_for_every_compiled_architecture() {
        let Some(ptxas) = ptxas() else {
            // Straight to stderr, past the test harness's capture: a skip must show.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no ptxas (set NVCC or CUDA_HOME): the L2 flush PTX was not assembled"
            );
            return;
        };
        let dir = std::env::temp_dir().join(format!("dk-l2-evict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("l2_evict.ptx");
        std::fs::write(&src, PTX).unwrap();
        let archs: Vec<&str> = distill_kernels::device::compiled_cuda_archs()
            .into_iter()
            .filter(|a| a.starts_with("sm_"))
            .collect();
        let archs = if archs.is_empty() {
            vec!["sm_80", "sm_90a"]
        } else {
            archs
        };
        for arch in archs {
            let out = Command::new(&ptxas)
                .args(["-arch", arch, "-v", "-o"])
                .arg(dir.join(format!("{arch}.cubin")))
                .arg(&src)
                .output()
                .expect("ptxas runs");
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "ptxas -arch {arch} failed:\n{log}");
            assert!(log.contains("dk_bench_l2_evict"), "{log}");
            assert!(
                log.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
                "{log}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
