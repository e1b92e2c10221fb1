//! `dk info`: version, backends found (or why not), compiled GPU architectures, nvcc version.

use cudarc::driver::{sys, CudaContext};
use distill_kernels::device::{
    compiled_cuda_archs, cuda_device_count, cuda_driver_present, nvcc_version,
};
use distill_kernels::Context;

fn driver_version() -> Option<String> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: only called after the driver library was found; `v` is a valid out-pointer.
    let rc = unsafe { sys::cuDriverGetVersion(&mut v) };
    (rc == sys::CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// One line about device `i` from the driver, whether or not the kernels load.
fn device_line(i: usize) -> String {
    let ctx = match CudaContext::new(i) {
        Ok(c) => c,
        Err(e) => return format!("cuda:{i}  cannot open: {e:?}"),
    };
    let name = ctx.name().unwrap_or_else(|_| "?".into());
    let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .unwrap_or(0);
    let l2 = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .unwrap_or(0);
    let mem = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    format!(
        "cuda:{i}  {name}, compute capability {ma}.{mi} (sm_{ma}{mi}), {sms} SMs, {} MB L2, {mem:.1} GiB",
        l2 >> 20
    )
}

/// Which compiled code a device of compute capability `cc` runs, given the compiled archs.
fn arch_match(archs: &[&str], (ma, mi): (i32, i32)) -> String {
    let sm = format!("sm_{ma}{mi}");
    if let Some(a) = archs.iter().find(|a| **a == sm || **a == format!("{sm}a")) {
        return format!("runs the {a} cubin");
    }
    // Cubins of the same major version and a lower minor run (not the `a` variants).
    if let Some(a) = archs.iter().find(|a| {
        a.strip_prefix("sm_")
            .and_then(|s| s.parse::<i32>().ok())
            .is_some_and(|v| v / 10 == ma && v % 10 <= mi)
    }) {
        return format!("runs the {a} cubin");
    }
    if let Some(p) = archs.iter().find(|a| a.starts_with("compute_")) {
        return format!("JIT-compiles the {p} PTX at load");
    }
    "no compatible code in this build".into()
}

pub fn run() -> i32 {
    outln!(
        "dk {} (distill-kernels), C ABI version {}",
        distill_kernels::VERSION,
        distill_kernels::C_ABI_VERSION
    );
    let archs = compiled_cuda_archs();
    match nvcc_version() {
        Some(v) => outln!("kernels:     compiled with nvcc {v}"),
        None => outln!("kernels:     none (nvcc was not found at build time: CPU backend only)"),
    }
    outln!(
        "GPU archs:   {}",
        if archs.is_empty() {
            "none".to_string()
        } else {
            archs.join(", ")
        }
    );
    match distill_kernels::switches::check() {
        Err(e) => outln!("A/B switches: {e} (a CUDA context will not open)"),
        Ok(()) => {
            let on = distill_kernels::switches::active();
            outln!(
                "A/B switches: {}",
                if on.is_empty() {
                    "none (the default kernels)".to_string()
                } else {
                    on.join(" ")
                }
            );
        }
    }
    outln!("backends:");
    outln!(
        "  cpu       yes: f64 reference, {} threads",
        std::thread::available_parallelism().map_or(1, |t| t.get())
    );
    let mut usable = 0;
    if !cuda_driver_present() {
        outln!("  cuda      no: no CUDA driver (libcuda could not be loaded)");
    } else {
        let drv = driver_version().unwrap_or_else(|| "?".into());
        let count = cuda_device_count();
        if count == 0 {
            outln!("  cuda      no: driver {drv} loaded but no CUDA device is visible");
        } else {
            outln!("  cuda      driver {drv}, {count} device(s)");
            for i in 0..count {
                outln!("    {}", device_line(i));
                match Context::cuda(i) {
                    Ok(ctx) => {
                        let cc = ctx.cuda_device().map_or((0, 0), |d| d.compute_capability());
                        outln!("      kernels loaded: yes ({})", arch_match(&archs, cc));
                        usable += 1;
                    }
                    Err(e) => outln!("      kernels loaded: no: {e}"),
                }
            }
        }
    }
    outln!(
        "best:        {}",
        if usable > 0 {
            Context::best().map_or_else(|e| format!("none: {e}"), |c| c.describe())
        } else {
            "cpu".into()
        }
    );
    0
}

#[cfg(test)]
mod tests {
    use super::arch_match;

    #[test]
    fn picks_the_right_code() {
        let archs = ["sm_80", "sm_90a", "compute_80"];
        assert_eq!(arch_match(&archs, (9, 0)), "runs the sm_90a cubin");
        assert_eq!(arch_match(&archs, (8, 6)), "runs the sm_80 cubin");
        assert!(arch_match(&archs, (10, 0)).contains("PTX"));
        assert!(arch_match(&[], (9, 0)).contains("no compatible"));
        // This build's list: Blackwell's cubins serve their families (B300 is 10.3, GB10 12.1).
        let archs = ["sm_80", "sm_90a", "sm_100", "sm_120", "compute_80"];
        assert_eq!(arch_match(&archs, (10, 0)), "runs the sm_100 cubin");
        assert_eq!(arch_match(&archs, (10, 3)), "runs the sm_100 cubin");
        assert_eq!(arch_match(&archs, (12, 1)), "runs the sm_120 cubin");
        assert!(arch_match(&archs, (11, 0)).contains("compute_80 PTX"));
    }
}
