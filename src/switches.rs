//! The `DK_*` environment switches: A/B choices between kernel variants for measurements
//! (README, "A/B switches"). Each is read once per process and parsed strictly: a value that is
//! not one of the switch's own makes opening a CUDA context fail with
//! [`ErrorKind::InvalidArgument`](crate::error::ErrorKind::InvalidArgument), naming the variable
//! and its values. A misspelt switch (`DK_DIVERGENCE_CLUSTER=persistent`) must not quietly
//! measure the default kernel in a scarce GPU session. Unset or empty means the default.

use std::sync::OnceLock;

use crate::error::{bail, Result};

/// A switch: its variable and the values it takes.
struct Switch {
    name: &'static str,
    values: &'static [&'static str],
}

/// Every switch the library reads (the CPU backend reads none).
const SWITCHES: &[Switch] = &[
    Switch {
        name: "DK_DIVERGENCE_CLUSTER",
        values: &["0", "smem", "stream", "persist", "persist256", "staged"],
    },
    Switch {
        name: "DK_DIVERGENCE_CLUSTER_SIZE",
        values: &["1", "2", "4", "8", "16"],
    },
    Switch {
        name: "DK_DIVERGENCE_JSD_STASH",
        values: &["0", "exp"],
    },
    Switch {
        name: "DK_MOE_PERMUTE",
        values: &["gather"],
    },
    Switch {
        name: "DK_MOE_PDL",
        values: &["0"],
    },
    Switch {
        name: "DK_MOE_BACKWARD",
        values: &["primitives"],
    },
    Switch {
        name: "DK_ATTENTION_FWD",
        values: &["mma", "wide", "wgmma"],
    },
    Switch {
        name: "DK_ATTENTION_BWD",
        values: &["mma", "wide", "wgmma"],
    },
];

/// One switch's raw value (`None`: unset or empty) checked against its values.
fn parse(sw: &Switch, raw: Option<&str>) -> std::result::Result<Option<&'static str>, String> {
    match raw {
        None | Some("") => Ok(None),
        Some(v) => sw
            .values
            .iter()
            .find(|&&x| x == v)
            .copied()
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "the A/B switch {}={v:?} is not one of its values ({}; unset for the default)",
                    sw.name,
                    sw.values.join(", ")
                )
            }),
    }
}

/// Every switch parsed from the environment, once: its value, or the message of a bad one.
fn parsed() -> &'static [std::result::Result<Option<&'static str>, String>] {
    static P: OnceLock<Vec<std::result::Result<Option<&'static str>, String>>> = OnceLock::new();
    P.get_or_init(|| {
        SWITCHES
            .iter()
            .map(|sw| {
                let raw = std::env::var_os(sw.name);
                match raw.as_ref().map(|r| r.to_str()) {
                    Some(None) => Err(format!("{} is not valid UTF-8", sw.name)),
                    r => parse(sw, r.flatten()),
                }
            })
            .collect()
    })
}

/// The value of switch `name` (one of [`SWITCHES`]): `None` when unset, empty or invalid (an
/// invalid value never reaches a kernel: [`check`] refuses the CUDA context first).
pub(crate) fn value(name: &str) -> Option<&'static str> {
    let i = SWITCHES.iter().position(|s| s.name == name);
    debug_assert!(i.is_some(), "{name} is not a DK_* switch");
    i.and_then(|i| parsed()[i].as_ref().ok().copied().flatten())
}

/// Called when a CUDA context opens.
///
/// # Errors
/// [`ErrorKind::InvalidArgument`](crate::error::ErrorKind::InvalidArgument) naming every switch
/// set to a value it does not take.
pub fn check() -> Result<()> {
    let bad: Vec<&str> = parsed()
        .iter()
        .filter_map(|r| r.as_ref().err().map(String::as_str))
        .collect();
    if !bad.is_empty() {
        bail!(InvalidArgument, "{}", bad.join("; "));
    }
    Ok(())
}

/// The A/B switches set in this process's environment, as `NAME=value` (valid values only):
/// what a benchmark run measured besides the defaults. Empty when none is set.
pub fn active() -> Vec<String> {
    SWITCHES
        .iter()
        .zip(parsed())
        .filter_map(|(sw, r)| {
            r.as_ref()
                .ok()
                .copied()
                .flatten()
                .map(|v| format!("{}={v}", sw.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(name: &str) -> &'static Switch {
        SWITCHES.iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn values_are_exact_and_unset_or_empty_is_the_default() {
        let c = switch("DK_DIVERGENCE_CLUSTER");
        assert_eq!(parse(c, None), Ok(None));
        assert_eq!(parse(c, Some("")), Ok(None));
        assert_eq!(parse(c, Some("persist")), Ok(Some("persist")));
        assert_eq!(parse(c, Some("persist256")), Ok(Some("persist256")));
        assert_eq!(parse(c, Some("staged")), Ok(Some("staged")));
        let size = switch("DK_DIVERGENCE_CLUSTER_SIZE");
        assert_eq!(parse(size, Some("16")), Ok(Some("16")));
        let stash = switch("DK_DIVERGENCE_JSD_STASH");
        assert_eq!(parse(stash, Some("0")), Ok(Some("0")));
        assert_eq!(parse(stash, Some("exp")), Ok(Some("exp")));
        assert!(parse(stash, Some("1")).is_err());
        for name in ["DK_ATTENTION_FWD", "DK_ATTENTION_BWD"] {
            for v in ["mma", "wide", "wgmma"] {
                assert_eq!(parse(switch(name), Some(v)), Ok(Some(v)), "{name}={v}");
            }
        }
        // Misspellings, case, padding and out-of-range sizes are errors, not the default.
        for (sw, bad) in [
            (c, "persistent"),
            (c, "Stream"),
            (size, "8 "),
            (size, "32"),
            (switch("DK_ATTENTION_BWD"), "WGMMA"),
            (switch("DK_ATTENTION_FWD"), "mma.sync"),
            (switch("DK_ATTENTION_FWD"), "default"),
            (switch("DK_MOE_PDL"), "false"),
            (switch("DK_MOE_PERMUTE"), "1"),
            (switch("DK_MOE_BACKWARD"), "fused"),
        ] {
            let err = parse(sw, Some(bad)).unwrap_err();
            assert!(
                err.contains(sw.name) && err.contains(&format!("{bad:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn no_source_file_reads_the_environment_but_this_one() {
        // A switch read with std::env::var elsewhere would bypass the strict parsing.
        fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("switches.rs")
                    && !path.components().any(|c| c.as_os_str() == "bin")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    if text.contains("env::var") {
                        found.push(path.display().to_string());
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "environment read outside src/switches.rs: {found:?}"
        );
    }

    #[test]
    fn every_switch_is_in_the_readme_table() {
        let readme = include_str!("../README.md");
        for sw in SWITCHES {
            assert!(
                readme.contains(&format!("`{}`", sw.name)),
                "{} not in README",
                sw.name
            );
            for v in sw.values {
                assert!(
                    readme.contains(&format!("`{v}`"))
                        || readme.contains(&format!(" {v},"))
                        || readme.contains(&format!(" {v} |")),
                    "{}={v} not in README's table",
                    sw.name
                );
            }
        }
    }
}
