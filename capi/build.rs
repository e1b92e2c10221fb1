//! Names the shared library by its C ABI version: SONAME `libdistill_kernels.so.<DK_ABI_VERSION>`
//! (Linux), read from the header, so a program linked against one ABI refuses to load a library
//! of another (the loader looks for its own version's file) instead of misreading its structs.
//! A link of that name to `libdistill_kernels.so` is made next to the library cargo puts in the
//! profile directory, so programs linked against the build tree (`-Ltarget/release`) run as they
//! did; `scripts/install-c-library.sh` installs the file under that name.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let header = manifest.join("../include/distill_kernels.h");
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let text = std::fs::read_to_string(&header)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", header.display()));
    let abi = text
        .lines()
        .find_map(|l| l.strip_prefix("#define DK_ABI_VERSION "))
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| panic!("no numeric #define DK_ABI_VERSION in {}", header.display()));
    let soname = format!("libdistill_kernels.so.{abi}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");

    link_soname(&soname);
}

/// Makes `<profile dir>/<soname>` a link to `libdistill_kernels.so`. OUT_DIR is
/// `<target>/<profile>/build/<package>-<hash>/out`, so the link goes beside the library cargo
/// puts in `<profile>` after this script (it dangles until then). (With cargo's `build-dir` set
/// apart from the target directory it lands in the build directory instead; the C ABI test then
/// says the link is missing.)
#[cfg(unix)]
fn link_soname(soname: &str) {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let Some(profile_dir) = out.ancestors().nth(3) else {
        return;
    };
    let link = profile_dir.join(soname);
    let _ = std::fs::remove_file(&link);
    // Links of other ABIs (a build tree that built an older one) would let a program linked
    // against that ABI load this library: only the current SONAME may name it.
    if let Ok(entries) = std::fs::read_dir(profile_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let other_abi = name
                .strip_prefix("libdistill_kernels.so.")
                .is_some_and(|abi| !abi.is_empty() && abi.bytes().all(|b| b.is_ascii_digit()));
            let ours = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.as_os_str() == "libdistill_kernels.so");
            if other_abi && ours && name != soname {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if let Err(e) = std::os::unix::fs::symlink("libdistill_kernels.so", &link) {
        println!(
            "cargo:warning=could not link {} -> libdistill_kernels.so ({e}): programs linked \
             against this build tree will not find the library by its SONAME",
            link.display()
        );
    }
}

/// A Linux target built on a host without symbolic links: no link (the SONAME still applies).
#[cfg(not(unix))]
fn link_soname(soname: &str) {
    println!("cargo:warning=no {soname} link made on this host: link it to libdistill_kernels.so");
}
