//! A small command-line parser (std only): `--flag value`, `--flag=value` and boolean switches.

use std::fmt;

/// A usage error: printed with a hint and exit status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! usage {
    ($($arg:tt)*) => { return Err($crate::cli::UsageError(format!($($arg)*))) };
}
pub(crate) use usage;

/// One parsed option.
pub enum Opt {
    /// A switch (`--quick`).
    Flag(String),
    /// An option with a value (`--rows 8`, `--rows=8`).
    Value(String, String),
}

/// Splits `args` into options, given which names are switches and which take a value.
/// Unknown names, missing values, values given to switches, positional words and an option
/// given twice (which one would win is a guess for the reader) are errors.
pub fn parse(
    command: &str,
    args: &[String],
    switches: &[&str],
    valued: &[&str],
) -> Result<Vec<Opt>, UsageError> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(body) = arg.strip_prefix("--") else {
            if arg == "-h" {
                out.push(Opt::Flag("help".into()));
                continue;
            }
            usage!("unexpected argument '{arg}' for 'dk {command}'");
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        if switches.contains(&name) {
            if inline.is_some() {
                usage!("option '--{name}' of 'dk {command}' takes no value");
            }
            out.push(Opt::Flag(name.to_string()));
        } else if valued.contains(&name) {
            if out
                .iter()
                .any(|o| matches!(o, Opt::Value(n, _) if n == name))
            {
                usage!("option '--{name}' of 'dk {command}' is given more than once");
            }
            let value = match inline {
                Some(v) => v,
                None => match it.next() {
                    Some(v) if !v.starts_with("--") => v.clone(),
                    _ => usage!("option '--{name}' of 'dk {command}' needs a value"),
                },
            };
            out.push(Opt::Value(name.to_string(), value));
        } else {
            usage!("unknown option '--{name}' for 'dk {command}'");
        }
    }
    Ok(out)
}

/// Parses a number, naming the option on failure.
pub fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, UsageError> {
    match value.trim().parse() {
        Ok(v) => Ok(v),
        Err(_) => usage!("option '--{name}': '{value}' is not a valid number"),
    }
}

/// Parses a comma-separated list with `item`, rejecting empty lists and empty items (`1,,2`).
pub fn list<T>(
    name: &str,
    value: &str,
    item: impl Fn(&str) -> Result<T, UsageError>,
) -> Result<Vec<T>, UsageError> {
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.iter().all(|s| s.is_empty()) {
        usage!("option '--{name}' needs at least one value");
    }
    if items.iter().any(|s| s.is_empty()) {
        usage!("option '--{name}': empty item in '{value}'");
    }
    items.into_iter().map(item).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_both_value_forms_and_switches() {
        let opts = parse(
            "bench",
            &strings(&["--rows", "8", "--vocab=1,2", "--quick"]),
            &["quick"],
            &["rows", "vocab"],
        )
        .unwrap();
        assert_eq!(opts.len(), 3);
        assert!(matches!(&opts[0], Opt::Value(n, v) if n == "rows" && v == "8"));
        assert!(matches!(&opts[1], Opt::Value(n, v) if n == "vocab" && v == "1,2"));
        assert!(matches!(&opts[2], Opt::Flag(n) if n == "quick"));
    }

    #[test]
    fn rejects_unknown_missing_and_positional() {
        let e = |a: &[&str]| parse("bench", &strings(a), &["quick"], &["rows"]).is_err();
        assert!(e(&["--nope"]));
        assert!(e(&["--rows"]));
        assert!(e(&["--rows", "--quick"]));
        assert!(e(&["--quick=1"]));
        assert!(e(&["extra"]));
        assert!(number::<usize>("rows", "x").is_err());
        assert!(list("vocab", " , ", |s| number::<usize>("vocab", s)).is_err());
        assert!(list("vocab", "1,,2", |s| number::<usize>("vocab", s)).is_err());
        assert!(list("vocab", "1,2,", |s| number::<usize>("vocab", s)).is_err());
        assert_eq!(
            list("vocab", " 1, 2 ", |s| number::<usize>("vocab", s)).unwrap(),
            vec![1, 2]
        );
        assert!(e(&["--rows", "8", "--rows=16"]));
    }
}
