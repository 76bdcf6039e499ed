//! The rescue-point file (`--rescue FILE`, TOML) and fault-injection specs (`--inject`).
//!
//! ```toml
//! [[rescue]]
//! name = "parse"                 # label (default: the function)
//! binary = "bugsrv"              # module file name (default: the executable)
//! function = "process_request"   # a symbol, or:
//! # offset = 0x1a2b0             # a function start relative to the load bias
//! return = -1                    # integer, "null", "-EINVAL", or "void"
//! enabled = true
//! every = 1                      # open a window on 1 in N entries
//! min_interval_ms = 0            # at most one window per interval
//! hang_timeout_ms = 2000         # 0: no hang detection
//! max_recoveries_per_minute = 600
//! ```

use serde::{Deserialize, Serialize};

/// Errors of rescue-point and injection specs.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// The file cannot be read.
    #[error("cannot read rescue-point file {path}: {reason}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        reason: String,
    },
    /// Not valid TOML or unknown fields.
    #[error("invalid rescue-point spec: {0}")]
    Syntax(String),
    /// A semantic error in one entry.
    #[error("rescue point {name}: {reason}")]
    Invalid {
        /// The point's label.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A bad `--inject` spec.
    #[error("invalid fault injection {spec:?}: {reason}")]
    Inject {
        /// The text.
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where a function is: a symbol or an offset from the module's load bias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Module file name (`None`: the executable).
    pub module: Option<String>,
    /// The function.
    pub function: introspect::FunctionSpec,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.module, &self.function) {
            (Some(m), introspect::FunctionSpec::Symbol(s)) => write!(f, "{m}!{s}"),
            (None, introspect::FunctionSpec::Symbol(s)) => write!(f, "{s}"),
            (Some(m), introspect::FunctionSpec::Offset(o)) => write!(f, "{m}+{o:#x}"),
            (None, introspect::FunctionSpec::Offset(o)) => write!(f, "+{o:#x}"),
        }
    }
}

/// What a rescued function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorValue {
    /// This value in RAX.
    Int(i64),
    /// Nothing (a `void` function whose errors show through its side effects).
    Void,
}

impl ErrorValue {
    /// As events show it: the integer, or `"void"`.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            ErrorValue::Int(v) => v.into(),
            ErrorValue::Void => "void".into(),
        }
    }
}

impl std::fmt::Display for ErrorValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorValue::Int(v) => write!(f, "{v}"),
            ErrorValue::Void => f.write_str("void"),
        }
    }
}

/// Policy of one rescue point (changeable at run time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Windows are opened at all.
    pub enabled: bool,
    /// Open a window on 1 in `every` entries.
    pub every: u64,
    /// At most one window per this many milliseconds (0: no limit).
    pub min_interval_ms: u64,
    /// A window open longer than this is a hang (0: never).
    pub hang_timeout_ms: u64,
    /// More recoveries than this within a minute quarantine the point.
    pub max_recoveries_per_minute: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            every: 1,
            min_interval_ms: 0,
            hang_timeout_ms: 0,
            max_recoveries_per_minute: 600,
        }
    }
}

/// One rescue point as specified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RescueSpec {
    /// Label.
    pub name: String,
    /// Where.
    pub location: Location,
    /// What the function returns when rescued.
    pub error_value: ErrorValue,
    /// Policy.
    pub policy: Policy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rescue: Vec<RawPoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    name: Option<String>,
    binary: Option<String>,
    function: Option<String>,
    offset: Option<i64>,
    #[serde(rename = "return")]
    ret: Option<toml::Value>,
    enabled: Option<bool>,
    every: Option<i64>,
    min_interval_ms: Option<i64>,
    hang_timeout_ms: Option<i64>,
    max_recoveries_per_minute: Option<i64>,
}

/// Parse a rescue-point file's text.
pub fn parse_rescue_file(text: &str) -> Result<Vec<RescueSpec>, SpecError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
    if raw.rescue.is_empty() {
        return Err(SpecError::Syntax(
            "no [[rescue]] entries (each needs at least `function` or `offset`, and `return`)"
                .into(),
        ));
    }
    let mut out: Vec<RescueSpec> = Vec::new();
    for (i, r) in raw.rescue.into_iter().enumerate() {
        let spec = point(i, r)?;
        if out.iter().any(|o| o.name == spec.name) {
            return Err(SpecError::Invalid {
                name: spec.name,
                reason: "a second rescue point has this name".into(),
            });
        }
        out.push(spec);
    }
    Ok(out)
}

/// Read and parse a rescue-point file.
pub fn read_rescue_file(path: &std::path::Path) -> Result<Vec<RescueSpec>, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_rescue_file(&text)
}

fn point(index: usize, r: RawPoint) -> Result<RescueSpec, SpecError> {
    let fallback = r
        .function
        .clone()
        .or_else(|| r.offset.map(|o| format!("+{o:#x}")))
        .unwrap_or_else(|| format!("#{}", index + 1));
    let name = r.name.clone().unwrap_or(fallback);
    let bad = |reason: String| SpecError::Invalid {
        name: name.clone(),
        reason,
    };
    let function = match (&r.function, r.offset) {
        (Some(_), Some(_)) => return Err(bad("give `function` or `offset`, not both".into())),
        (None, None) => return Err(bad("needs `function` (a symbol) or `offset`".into())),
        (Some(f), None) if f.trim().is_empty() => return Err(bad("empty `function`".into())),
        (Some(f), None) => introspect::FunctionSpec::Symbol(f.trim().to_string()),
        (None, Some(o)) => introspect::FunctionSpec::Offset(
            u64::try_from(o).map_err(|_| bad(format!("negative offset {o}")))?,
        ),
    };
    let error_value = match &r.ret {
        None => {
            return Err(bad(
                "needs `return` (an integer, \"null\", \"-EINVAL\" or \"void\")".into(),
            ))
        }
        Some(v) => parse_error_value(v).map_err(bad)?,
    };
    let non_negative = |field: &str, v: Option<i64>, default: u64| -> Result<u64, SpecError> {
        match v {
            None => Ok(default),
            Some(n) => {
                u64::try_from(n).map_err(|_| bad(format!("`{field}` must be >= 0, not {n}")))
            }
        }
    };
    let d = Policy::default();
    let every = non_negative("every", r.every, d.every)?;
    if every == 0 {
        return Err(bad("`every` must be at least 1".into()));
    }
    let max = non_negative(
        "max_recoveries_per_minute",
        r.max_recoveries_per_minute,
        u64::from(d.max_recoveries_per_minute),
    )?;
    let policy = Policy {
        enabled: r.enabled.unwrap_or(true),
        every,
        min_interval_ms: non_negative("min_interval_ms", r.min_interval_ms, 0)?,
        hang_timeout_ms: non_negative("hang_timeout_ms", r.hang_timeout_ms, 0)?,
        max_recoveries_per_minute: u32::try_from(max)
            .map_err(|_| bad(format!("`max_recoveries_per_minute` {max} is too large")))?,
    };
    let module = match r.binary {
        Some(b) if b.trim().is_empty() => return Err(bad("empty `binary`".into())),
        b => b.map(|s| s.trim().to_string()),
    };
    Ok(RescueSpec {
        name,
        location: Location { module, function },
        error_value,
        policy,
    })
}

fn parse_error_value(v: &toml::Value) -> Result<ErrorValue, String> {
    match v {
        toml::Value::Integer(n) => Ok(ErrorValue::Int(*n)),
        toml::Value::Boolean(b) => Ok(ErrorValue::Int(i64::from(*b))),
        toml::Value::String(s) => {
            let t = s.trim();
            match t {
                "void" => Ok(ErrorValue::Void),
                "null" | "NULL" => Ok(ErrorValue::Int(0)),
                _ => {
                    let (neg, name) = match t.strip_prefix('-') {
                        Some(n) => (true, n),
                        None => (false, t),
                    };
                    match crate::errno::Errno::from_name(name) {
                        Some(e) => {
                            let n = i64::from(e.0);
                            Ok(ErrorValue::Int(if neg { -n } else { n }))
                        }
                        None => Err(format!(
                            "`return` {s:?} is not an integer, \"null\", \"void\" or an errno name like \"-EINVAL\""
                        )),
                    }
                }
            }
        }
        other => Err(format!(
            "`return` must be an integer or a string, not {other}"
        )),
    }
}

/// How an injected fault shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// A NULL-pointer access (SIGSEGV at address 0) at the function's first instruction.
    Segv,
    /// abort(): SIGABRT sent by the thread to itself.
    Abort,
    /// An endless loop (only a hang timeout ends it).
    Hang,
}

/// `--inject FUNCTION:nth=N:kind=K[:every=M][:count=C]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSpec {
    /// The function.
    pub location: Location,
    /// First faulting call (1-based).
    pub nth: u64,
    /// Then again every this many calls (0: only once).
    pub every: u64,
    /// At most this many faults (0: no limit).
    pub count: u64,
    /// The fault.
    pub kind: FaultKind,
}

impl std::fmt::Display for InjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            FaultKind::Segv => "segv",
            FaultKind::Abort => "abort",
            FaultKind::Hang => "hang",
        };
        write!(f, "{}:nth={}:kind={kind}", self.location, self.nth)?;
        if self.every > 0 {
            write!(f, ":every={}", self.every)?;
        }
        if self.count > 0 {
            write!(f, ":count={}", self.count)?;
        }
        Ok(())
    }
}

/// Parse `FUNCTION:nth=N:kind=segv|abort|hang[:every=M][:count=C]`.
pub fn parse_inject(text: &str) -> Result<InjectSpec, SpecError> {
    let bad = |reason: &str| SpecError::Inject {
        spec: text.to_string(),
        reason: reason.to_string(),
    };
    let mut parts = text.split(':');
    let func = parts.next().unwrap_or_default().trim();
    if func.is_empty() {
        return Err(bad(
            "no function (expected FUNCTION:nth=N:kind=segv|abort|hang)",
        ));
    }
    let (module, function) =
        introspect::parse_function_spec(func).map_err(|e| bad(&e.to_string()))?;
    let (mut nth, mut kind, mut every, mut count) = (None, None, 0, 0);
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| bad(&format!("{p:?} is not KEY=VALUE")))?;
        let num = || {
            v.trim()
                .parse::<u64>()
                .map_err(|_| bad(&format!("{k}={v:?} is not a non-negative integer")))
        };
        match k.trim() {
            "nth" => nth = Some(num()?),
            "every" => every = num()?,
            "count" => count = num()?,
            "kind" => {
                kind = Some(match v.trim() {
                    "segv" => FaultKind::Segv,
                    "abort" => FaultKind::Abort,
                    "hang" => FaultKind::Hang,
                    other => {
                        return Err(bad(&format!("unknown kind {other:?} (segv, abort, hang)")))
                    }
                })
            }
            other => {
                return Err(bad(&format!(
                    "unknown key {other:?} (nth, kind, every, count)"
                )))
            }
        }
    }
    let nth = nth.ok_or_else(|| bad("missing nth=N"))?;
    if nth == 0 {
        return Err(bad("nth counts calls from 1"));
    }
    Ok(InjectSpec {
        location: Location { module, function },
        nth,
        every,
        count,
        kind: kind.ok_or_else(|| bad("missing kind=segv|abort|hang"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspect::FunctionSpec;

    #[test]
    fn a_full_entry_parses() {
        let v = parse_rescue_file(
            r#"
[[rescue]]
name = "parse"
binary = "lighttpd"
function = "http_request_parse"
return = -1
every = 4
min_interval_ms = 10
hang_timeout_ms = 250
max_recoveries_per_minute = 30

[[rescue]]
offset = 0x1a2b0
return = "-EINVAL"

[[rescue]]
function = "log"
return = "void"
enabled = false
"#,
        )
        .expect("valid");
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].name, "parse");
        assert_eq!(v[0].location.module.as_deref(), Some("lighttpd"));
        assert_eq!(v[0].error_value, ErrorValue::Int(-1));
        assert_eq!(v[0].policy.every, 4);
        assert_eq!(v[0].policy.hang_timeout_ms, 250);
        assert_eq!(v[1].location.function, FunctionSpec::Offset(0x1a2b0));
        assert_eq!(v[1].error_value, ErrorValue::Int(-22));
        assert_eq!(v[1].name, "+0x1a2b0");
        assert_eq!(v[2].error_value, ErrorValue::Void);
        assert!(!v[2].policy.enabled);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases = [
            ("", "no [[rescue]]"),
            ("[[rescue]]\nfunction = \"f\"\n", "needs `return`"),
            ("[[rescue]]\nreturn = 1\n", "needs `function`"),
            ("[[rescue]]\nfunction = \"f\"\noffset = 1\nreturn = 1\n", "not both"),
            ("[[rescue]]\nfunction = \"f\"\nreturn = \"EWHAT\"\n", "errno name"),
            ("[[rescue]]\nfunction = \"f\"\nreturn = 1\nevery = 0\n", "at least 1"),
            ("[[rescue]]\nfunction = \"f\"\nreturn = 1\nhang_timeout_ms = -5\n", ">= 0"),
            ("[[rescue]]\nfunction = \"f\"\nreturn = 1\ncolour = 1\n", "unknown field"),
            ("[[rescue]]\nfunction = \"f\"\nreturn = 1\n[[rescue]]\nfunction = \"f\"\nreturn = 2\n", "second"),
            ("[[rescue]\n", "invalid"),
        ];
        for (text, want) in cases {
            let e = parse_rescue_file(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn inject_specs_parse_strictly() {
        let s = parse_inject("process_request:nth=3:kind=segv").expect("valid");
        assert_eq!(s.nth, 3);
        assert_eq!(s.kind, FaultKind::Segv);
        assert_eq!(
            s.location.function,
            FunctionSpec::Symbol("process_request".into())
        );
        let s = parse_inject("libc.so.6!malloc:nth=1:kind=abort:every=10:count=5").expect("valid");
        assert_eq!(s.location.module.as_deref(), Some("libc.so.6"));
        assert_eq!((s.every, s.count), (10, 5));
        assert_eq!(
            s.to_string(),
            "libc.so.6!malloc:nth=1:kind=abort:every=10:count=5"
        );
        let s = parse_inject("lighttpd+0x1f00:nth=2:kind=hang").expect("valid");
        assert_eq!(s.location.function, FunctionSpec::Offset(0x1f00));
        for bad in [
            "",
            "f",
            "f:kind=segv",
            "f:nth=0:kind=segv",
            "f:nth=1",
            "f:nth=1:kind=boom",
            "f:nth=x:kind=segv",
            "f:nth=1:kind=segv:when=now",
            "f:nth=1:kind=segv:every",
        ] {
            assert!(parse_inject(bad).is_err(), "{bad:?} accepted");
        }
    }
}
