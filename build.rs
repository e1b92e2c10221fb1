//! Compiles every kernel in `cuda/` into one fatbin (sm_80, sm_90a, sm_100 and sm_120 cubins,
//! compute_80 PTX) embedded in the library. Without `nvcc` the crate still builds, CPU backend only.
//!
//! Environment:
//! - `NVCC`, `CUDA_HOME` (`$CUDA_HOME/bin/nvcc`), then `PATH`: where to find the compiler.
//! - `DISTILL_KERNELS_REQUIRE_NVCC=1`: a missing or failing `nvcc`, a register spill, or ptxas
//!   serialising warpgroup MMAs, is an error.
//! - `DISTILL_KERNELS_PTXAS_REPORT=1`: print ptxas resource usage (registers, spills, smem) as
//!   cargo warnings. The full report is always written to `$OUT_DIR/ptxas-report.txt`.
//! - `NVCC_CCBIN`: host compiler handed to `nvcc -ccbin`.
//! - `DISTILL_KERNELS_CACHE`: where compiled fatbins are kept by content (default
//!   `<target dir>/distill-kernels-fatbins`; empty: no cache). `cargo clippy`, `build`, `test`
//!   and `doc` each run this script in their own `OUT_DIR`; with the cache only the first of them
//!   for a given set of sources, flags and compiler pays the minutes `nvcc` takes.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Architectures compiled into the fatbin: (virtual arch, real code). Blackwell (sm_100: B200,
/// B300, GB200; sm_120: RTX 50, RTX PRO 6000) gets cubins of the sm_80 code, because the driver
/// would otherwise JIT the 10 MB of compute_80 PTX when a device first opens (about a minute of
/// ptxas); the PTX stays for later architectures. The Hopper-only kernels (clusters, wgmma) are
/// empty outside sm_90a, and the launchers pick them on compute capability 9.0 only.
const GENCODES: &[(&str, &str)] = &[
    ("compute_80", "sm_80"),
    ("compute_90a", "sm_90a"),
    ("compute_80", "sm_100"),
    ("compute_80", "sm_120"),
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
        "DISTILL_KERNELS_CACHE",
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
                out_dir.join(FATBIN).display()
            );
            // For the unit test that every kernel the launchers name was compiled.
            println!(
                "cargo::rustc-env=DK_PTXAS_REPORT={}",
                out_dir.join(REPORT).display()
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

/// The fatbin and the ptxas report in `out_dir`, from the cache when it holds this exact
/// compilation, else from `nvcc` (and then stored in the cache).
fn compile_fatbin(nvcc: &Path, out_dir: &Path) -> Result<String, String> {
    let unity = write_unity_source(out_dir)?;
    let cuda_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let fatbin = out_dir.join(FATBIN);
    let mut args: Vec<String> = [
        "-fatbin",
        "-O3",
        "-std=c++17",
        "-Xptxas=-v",
        "-Xptxas=-warn-spills",
        // Compressed cubins/PTX (the driver inflates them at load): ~3x smaller binaries.
        "-Xfatbin=-compress-all",
        // The three targets compiled side by side (0: one thread per core).
        "--threads=0",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("-I{}", cuda_dir.join("include").display()));
    for (arch, code) in GENCODES {
        args.push(format!("-gencode=arch={arch},code={code}"));
    }
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        args.extend(["-ccbin".to_string(), ccbin]);
    }
    let cache = cache_dir(out_dir).map(|dir| {
        let key = cache_key(nvcc, &args, &unity, &cuda_dir);
        dir.join(format!("{key:016x}"))
    });
    if let Some(entry) = &cache {
        if let Some(report) = cache_fetch(entry, out_dir) {
            return Ok(report);
        }
    }
    let out = Command::new(nvcc)
        .args(&args)
        .arg("-o")
        .arg(&fatbin)
        .arg(&unity)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::write(out_dir.join(REPORT), &report);
    if !out.status.success() {
        return Err(format!("nvcc failed ({}):\n{report}", out.status));
    }
    if let Some(entry) = &cache {
        cache_store(entry, out_dir);
    }
    Ok(report)
}

const FATBIN: &str = "distill_kernels.fatbin";
const REPORT: &str = "ptxas-report.txt";
/// Cache entries kept (the most recently used): a few branches' worth, ~3 MB each.
const CACHE_KEEP: usize = 4;

/// `DISTILL_KERNELS_CACHE`, else `<target dir>/distill-kernels-fatbins` when `out_dir` has
/// cargo's layout (`<target>[/<triple>]/<profile>/build/<pkg>-<hash>/out`); None: no cache.
fn cache_dir(out_dir: &Path) -> Option<PathBuf> {
    if let Ok(dir) = env::var("DISTILL_KERNELS_CACHE") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    let build = out_dir.ancestors().nth(2)?;
    if build.file_name()? != "build" {
        return None;
    }
    Some(build.parent()?.parent()?.join("distill-kernels-fatbins"))
}

/// FNV-1a over everything the fatbin depends on: the compiler's identity, the flags, the unity
/// source (the .cu paths) and every source under `cuda/` (names and bytes, in sorted order).
fn cache_key(nvcc: &Path, args: &[String], unity: &Path, cuda_dir: &Path) -> u64 {
    fn feed(h: &mut u64, bytes: &[u8]) {
        for chunk in [&(bytes.len() as u64).to_le_bytes()[..], bytes] {
            for &b in chunk {
                *h = (*h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
    }
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.is_dir() {
                files(&path, out);
            } else if path
                .extension()
                .is_some_and(|x| x == "cu" || x == "cuh" || x == "h")
            {
                out.push(path); // not the notes (*.md): editing them changes no kernel
            }
        }
    }
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    let version = Command::new(nvcc).arg("--version").output();
    feed(&mut h, nvcc.to_string_lossy().as_bytes());
    feed(&mut h, &version.map(|o| o.stdout).unwrap_or_default());
    for a in args {
        feed(&mut h, a.as_bytes());
    }
    feed(&mut h, &fs::read(unity).unwrap_or_default());
    let mut sources = Vec::new();
    files(cuda_dir, &mut sources);
    sources.sort();
    for path in sources {
        feed(&mut h, path.to_string_lossy().as_bytes());
        feed(&mut h, &fs::read(&path).unwrap_or_default());
    }
    h
}

/// Copies a cached entry into `out_dir`; the report, or None on a miss (or any error).
fn cache_fetch(entry: &Path, out_dir: &Path) -> Option<String> {
    let report = fs::read_to_string(entry.join(REPORT)).ok()?;
    fs::copy(entry.join(FATBIN), out_dir.join(FATBIN)).ok()?;
    fs::write(out_dir.join(REPORT), &report).ok()?;
    // Marks the entry as recently used, for the pruning in cache_store.
    let _ = fs::write(entry.join("used"), b"");
    Some(report)
}

/// Stores `out_dir`'s fatbin and report as `entry` (written beside it, then renamed, so a
/// concurrent build never sees half an entry), then keeps the CACHE_KEEP most recent entries.
/// Failures only cost the next build a compilation.
fn cache_store(entry: &Path, out_dir: &Path) {
    let Some(dir) = entry.parent() else { return };
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let staged = fs::create_dir_all(&tmp).is_ok()
        && fs::copy(out_dir.join(FATBIN), tmp.join(FATBIN)).is_ok()
        && fs::copy(out_dir.join(REPORT), tmp.join(REPORT)).is_ok()
        && fs::write(tmp.join("used"), b"").is_ok();
    if !staged || fs::rename(&tmp, entry).is_err() {
        let _ = fs::remove_dir_all(&tmp);
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .map(|p| {
            let used = fs::metadata(p.join("used")).and_then(|m| m.modified());
            (used.unwrap_or(std::time::UNIX_EPOCH), p)
        })
        .collect();
    kept.sort_by_key(|e| std::cmp::Reverse(e.0)); // most recently used first
    for (_, old) in kept.into_iter().skip(CACHE_KEEP) {
        let _ = fs::remove_dir_all(old);
    }
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
