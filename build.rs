//! Compiles every kernel in `cuda/` into one fatbin (sm_80 and sm_90a cubins, compute_80 PTX)
//! embedded in the library. Without `nvcc` the crate still builds, CPU backend only.
//!
//! Environment:
//! - `NVCC`, `CUDA_HOME` (`$CUDA_HOME/bin/nvcc`), then `PATH`: where to find the compiler.
//! - `DISTILL_KERNELS_REQUIRE_NVCC=1`: a missing or failing `nvcc`, a register spill, or ptxas
//!   serialising warpgroup MMAs, is an error.
//! - `DISTILL_KERNELS_PTXAS_REPORT=1`: print ptxas resource usage (registers, spills, smem) as
//!   cargo warnings. The full report is always written to `$OUT_DIR/ptxas-report.txt`.
//! - `NVCC_CCBIN`: host compiler handed to `nvcc -ccbin`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Architectures compiled into the fatbin: (virtual arch, real code).
const GENCODES: &[(&str, &str)] = &[
    ("compute_80", "sm_80"),
    ("compute_90a", "sm_90a"),
    ("compute_80", "compute_80"),
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dk_cuda_kernels)");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "NVCC_CCBIN",
        "DISTILL_KERNELS_REQUIRE_NVCC",
        "DISTILL_KERNELS_PTXAS_REPORT",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-changed=build.rs");

    let require = env::var("DISTILL_KERNELS_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    let Some(nvcc) = find_nvcc() else {
        fail_or_warn(
            require,
            "nvcc not found (set NVCC or CUDA_HOME, or run scripts/install-cuda-toolchain.sh): \
             building the CPU backend only",
        );
        return;
    };
    match compile_fatbin(&nvcc, &out_dir) {
        Ok(report) => {
            let spills = spill_lines(&report);
            if !spills.is_empty() {
                fail_or_warn(
                    require,
                    &format!("ptxas reports register spills:\n{}", spills.join("\n")),
                );
            }
            let serialized = wgmma_serialization_lines(&report);
            if !serialized.is_empty() {
                fail_or_warn(
                    require,
                    &format!(
                        "ptxas serialises warpgroup MMAs (a register of a product in flight is \
                         touched; see cuda/include/dk_wgmma.cuh, \"Ordering\"):\n{}",
                        serialized.join("\n")
                    ),
                );
            }
            if env::var("DISTILL_KERNELS_PTXAS_REPORT").is_ok_and(|v| v == "1") {
                for line in report.lines().filter(|l| l.contains("ptxas info")) {
                    println!("cargo::warning={line}");
                }
            }
            println!("cargo::rustc-cfg=dk_cuda_kernels");
            println!(
                "cargo::rustc-env=DK_FATBIN_PATH={}",
                out_dir.join("distill_kernels.fatbin").display()
            );
            // For the unit test that every kernel the launchers name was compiled.
            println!(
                "cargo::rustc-env=DK_PTXAS_REPORT={}",
                out_dir.join("ptxas-report.txt").display()
            );
            let archs: Vec<&str> = GENCODES.iter().map(|(_, code)| *code).collect();
            println!("cargo::rustc-env=DK_CUDA_ARCHS={}", archs.join(","));
            println!(
                "cargo::rustc-env=DK_NVCC_VERSION={}",
                nvcc_version(&nvcc).unwrap_or_else(|| "unknown".into())
            );
        }
        Err(msg) => fail_or_warn(require, &msg),
    }
}

fn fail_or_warn(require: bool, msg: &str) {
    if require {
        panic!("DISTILL_KERNELS_REQUIRE_NVCC=1: {msg}");
    }
    for line in msg.lines() {
        println!("cargo::warning={line}");
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Ok(home) = env::var("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("nvcc"))
            .find(|p| p.is_file())
    })
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split("release ").nth(1))
        .map(|s| s.trim().to_string())
}

/// One translation unit that includes every `cuda/*.cu`, so all kernels land in one fatbin.
fn write_unity_source(out_dir: &Path) -> Result<PathBuf, String> {
    let cuda_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut sources: Vec<PathBuf> = fs::read_dir(&cuda_dir)
        .map_err(|e| format!("cannot read {}: {e}", cuda_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let body: String = sources
        .iter()
        .map(|p| format!("#include \"{}\"\n", p.display()))
        .collect();
    let unity = out_dir.join("distill_kernels_all.cu");
    fs::write(&unity, body).map_err(|e| format!("cannot write {}: {e}", unity.display()))?;
    Ok(unity)
}

fn compile_fatbin(nvcc: &Path, out_dir: &Path) -> Result<String, String> {
    let unity = write_unity_source(out_dir)?;
    let include = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cuda")
        .join("include");
    let fatbin = out_dir.join("distill_kernels.fatbin");
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-Xptxas=-v")
        .arg("-Xptxas=-warn-spills")
        // Compressed cubins/PTX (the driver inflates them at load): ~3x smaller binaries.
        .arg("-Xfatbin=-compress-all")
        .arg(format!("-I{}", include.display()))
        .arg("-o")
        .arg(&fatbin)
        .arg(&unity);
    for (arch, code) in GENCODES {
        cmd.arg(format!("-gencode=arch={arch},code={code}"));
    }
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::write(out_dir.join("ptxas-report.txt"), &report);
    if !out.status.success() {
        return Err(format!("nvcc failed ({}):\n{report}", out.status));
    }
    Ok(report)
}

/// Lines of the ptxas report where it serialised wgmma products or inserted its own
/// `warpgroup.arrive` (C7510 / C7519 on sm_90a): the products then stop overlapping, a silent
/// loss of speed.
fn wgmma_serialization_lines(report: &str) -> Vec<String> {
    report
        .lines()
        .filter(|l| {
            l.contains("wgmma.mma_async instructions are serialized")
                || l.contains("warpgroup.arrive is injected")
        })
        .map(str::to_string)
        .collect()
}

/// Lines of the ptxas report that announce a non-zero spill.
fn spill_lines(report: &str) -> Vec<String> {
    report
        .lines()
        .filter(|l| {
            l.contains("spill stores") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
        })
        .map(str::to_string)
        .collect()
}
