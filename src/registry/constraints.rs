//! Version constraints the way Terraform reads them (`>= 1.2, < 2.0`, `~> 1.0`, `= 1.2.3`,
//! `!= 1.4.0`), and choosing the newest version that meets them. No I/O.
//!
//! As in Terraform: constraints separated by commas must all hold; `~> X.Y` allows the last
//! given part to grow (`~> 1.2` is `>= 1.2.0, < 2.0.0`, `~> 1.2.3` is `>= 1.2.3, < 1.3.0`); a
//! pre-release is chosen only when a constraint names it exactly; a missing constraint means
//! any release.

use std::cmp::Ordering;
use std::fmt;

/// A semantic version: `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]` (build metadata ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemVer {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    pub pre: String,
}

impl SemVer {
    /// Parses a full version (`v` prefix allowed, as registries sometimes list).
    pub fn parse(s: &str) -> Option<SemVer> {
        let (v, given) = parse_partial(s)?;
        (given == 3).then_some(v)
    }

    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }
}

/// Parses `1`, `1.2`, `1.2.3`, `1.2.3-beta.1`: the version (missing parts 0) and how many
/// numeric parts were given.
fn parse_partial(s: &str) -> Option<(SemVer, usize)> {
    let s = s.trim();
    let s = s.strip_prefix('v').unwrap_or(s);
    let s = s.split_once('+').map_or(s, |(v, _)| v);
    let (nums, pre) = match s.split_once('-') {
        Some((n, p)) if !p.is_empty() => (n, p.to_owned()),
        Some(_) => return None,
        None => (s, String::new()),
    };
    let parts: Vec<&str> = nums.split('.').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut n = [0u64; 3];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n[i] = p.parse().ok()?;
    }
    if !pre.is_empty() && parts.len() < 3 {
        return None;
    }
    Some((
        SemVer {
            major: n[0],
            minor: n[1],
            patch: n[2],
            pre,
        },
        parts.len(),
    ))
}

impl Ord for SemVer {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => cmp_pre(&self.pre, &other.pre),
            })
    }
}

impl PartialOrd for SemVer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Semver pre-release precedence: dot-separated identifiers, numeric ones numerically and
/// below alphanumeric ones.
fn cmp_pre(a: &str, b: &str) -> Ordering {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

impl fmt::Display for SemVer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if !self.pre.is_empty() {
            write!(f, "-{}", self.pre)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Pessimistic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct One {
    op: Op,
    version: SemVer,
    /// Numeric parts given (1 to 3).
    given: usize,
}

/// A conjunction of constraints; empty means any release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints(Vec<One>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid version constraint {0:?}")]
pub struct ConstraintError(pub String);

impl Constraints {
    /// Parses `">= 1.2, < 2.0"`. An empty string is no constraint.
    pub fn parse(s: &str) -> Result<Constraints, ConstraintError> {
        let err = || ConstraintError(s.chars().take(100).collect());
        let mut out = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(err());
            }
            let (op, rest) = [
                ("~>", Op::Pessimistic),
                (">=", Op::Ge),
                ("<=", Op::Le),
                ("!=", Op::Ne),
                ("=", Op::Eq),
                (">", Op::Gt),
                ("<", Op::Lt),
            ]
            .iter()
            .find_map(|(p, op)| part.strip_prefix(p).map(|r| (*op, r)))
            .unwrap_or((Op::Eq, part));
            let (version, given) = parse_partial(rest).ok_or_else(err)?;
            out.push(One { op, version, given });
        }
        Ok(Constraints(out))
    }

    /// Both sets at once (constraints from several modules on one provider).
    pub fn and(mut self, other: &Constraints) -> Constraints {
        self.0.extend(other.0.iter().cloned());
        self
    }

    pub fn matches(&self, v: &SemVer) -> bool {
        // A pre-release only when some constraint names exactly it.
        if v.is_prerelease()
            && !self
                .0
                .iter()
                .any(|c| c.op == Op::Eq && c.given == 3 && c.version == *v)
        {
            return false;
        }
        self.0.iter().all(|c| c.matches(v))
    }

    /// The newest of `versions` that meets the constraints.
    pub fn newest<'a, I>(&self, versions: I) -> Option<SemVer>
    where
        I: IntoIterator<Item = &'a str>,
    {
        versions
            .into_iter()
            .filter_map(SemVer::parse)
            .filter(|v| self.matches(v))
            .max()
    }
}

impl fmt::Display for Constraints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("any version");
        }
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let op = match c.op {
                Op::Eq => "=",
                Op::Ne => "!=",
                Op::Gt => ">",
                Op::Ge => ">=",
                Op::Lt => "<",
                Op::Le => "<=",
                Op::Pessimistic => "~>",
            };
            let v = &c.version;
            match c.given {
                1 => write!(f, "{op} {}", v.major)?,
                2 => write!(f, "{op} {}.{}", v.major, v.minor)?,
                _ => write!(f, "{op} {v}")?,
            }
        }
        Ok(())
    }
}

impl One {
    fn matches(&self, v: &SemVer) -> bool {
        let c = &self.version;
        // Compare releases by their numbers only for the range operators, as Terraform does
        // once the pre-release rule above has let a version through.
        match self.op {
            Op::Eq if self.given < 3 => prefix_eq(c, self.given, v),
            Op::Eq => v == c,
            Op::Ne if self.given < 3 => !prefix_eq(c, self.given, v),
            Op::Ne => v != c,
            Op::Gt => v > c,
            Op::Ge => v >= c,
            Op::Lt => v < c,
            Op::Le => v <= c,
            Op::Pessimistic => {
                if v < c {
                    return false;
                }
                match self.given {
                    1 | 2 => v.major == c.major,
                    _ => v.major == c.major && v.minor == c.minor,
                }
            }
        }
    }
}

/// `= 1.2` means any 1.2.x.
fn prefix_eq(c: &SemVer, given: usize, v: &SemVer) -> bool {
    v.major == c.major && (given < 2 || v.minor == c.minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newest(c: &str, vs: &[&str]) -> Option<String> {
        Constraints::parse(c)
            .unwrap()
            .newest(vs.iter().copied())
            .map(|v| v.to_string())
    }

    const VS: &[&str] = &[
        "0.9.0",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "1.2.0-beta.1",
        "1.2.0",
        "1.10.0",
        "2.0.0",
        "2.1.0-rc1",
    ];

    #[test]
    fn pessimistic_grows_the_last_part_given() {
        assert_eq!(newest("~> 1.0", VS).as_deref(), Some("1.10.0"));
        assert_eq!(newest("~> 1.0.0", VS).as_deref(), Some("1.0.1"));
        assert_eq!(newest("~> 1", VS).as_deref(), Some("1.10.0"));
        assert_eq!(newest("~> 1.2", VS).as_deref(), Some("1.10.0"));
        assert_eq!(newest("~> 2.0", VS).as_deref(), Some("2.0.0"));
    }

    #[test]
    fn ranges_exact_and_exclusions() {
        assert_eq!(newest(">= 1.0, < 2.0", VS).as_deref(), Some("1.10.0"));
        assert_eq!(newest("1.0.1", VS).as_deref(), Some("1.0.1"));
        assert_eq!(newest("= 1.1.0", VS).as_deref(), Some("1.1.0"));
        assert_eq!(
            newest("> 1.0.0, != 1.10.0, < 2", VS).as_deref(),
            Some("1.2.0")
        );
        assert_eq!(newest("", VS).as_deref(), Some("2.0.0"));
        assert_eq!(newest("> 5.0", VS), None);
        assert_eq!(newest("<= 0.9.0", VS).as_deref(), Some("0.9.0"));
    }

    #[test]
    fn prereleases_only_when_named() {
        assert_eq!(newest(">= 2.0.0", VS).as_deref(), Some("2.0.0"));
        assert_eq!(newest("= 2.1.0-rc1", VS).as_deref(), Some("2.1.0-rc1"));
        assert_eq!(newest("1.2.0-beta.1", VS).as_deref(), Some("1.2.0-beta.1"));
    }

    #[test]
    fn sealed_cache_resolves_to_what_it_has() {
        // Upstream had 1.1.0; the enclave holds only 1.0.0.
        assert_eq!(newest("~> 1.0", &["1.0.0"]).as_deref(), Some("1.0.0"));
    }

    #[test]
    fn constraints_print_as_written() {
        let c = Constraints::parse(">=1.2,  < 2.0.0, ~> 1").unwrap();
        assert_eq!(c.to_string(), ">= 1.2, < 2.0.0, ~> 1");
        assert_eq!(Constraints::default().to_string(), "any version");
    }

    #[test]
    fn bad_constraints_are_refused() {
        for bad in ["~>", ">= x", "1.2.3.4", ">= 1,", "1.0-beta"] {
            assert!(Constraints::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn semver_precedence() {
        let p = |s| SemVer::parse(s).unwrap();
        assert!(p("1.0.0-alpha") < p("1.0.0-alpha.1"));
        assert!(p("1.0.0-alpha.1") < p("1.0.0-beta"));
        assert!(p("1.0.0-beta.2") < p("1.0.0-beta.11"));
        assert!(p("1.0.0-rc.1") < p("1.0.0"));
        assert!(p("1.9.0") < p("1.10.0"));
    }
}
