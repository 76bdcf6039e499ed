//! gdb's `monitor` commands: the operator's control requests ([`crate::control`]) from
//! inside a debugging session, answered as text.

use crate::control::Request;

use super::target::SandboxTarget;

const HELP: &str = "\
assure-vmm monitor commands:
  status                 the sandbox: threads, checkpoints, memory
  rescue                 rescue points, injections and open windows
  windows                open rescue windows by thread
  events [N]             the last N events (default 20)
  checkpoint             take a checkpoint of the stopped sandbox
  rollback [ID]          roll back to checkpoint ID (default: the newest);
                         then `maint flush register-cache`, as registers changed
  release ID             release checkpoint ID
  rescue-enable NAME on|off
  inject SPEC            FUNCTION:nth=N:kind=segv|abort|hang[:every=M][:count=K]
  help                   this text";

/// Parse a monitor command line into a control request.
pub fn parse(line: &str) -> Result<Option<Request>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let id = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("not a checkpoint id: {s:?}"))
    };
    let req = match words.as_slice() {
        [] | ["help"] => return Ok(None),
        ["status"] => Request::Status,
        ["rescue"] | ["windows"] => Request::Rescue,
        ["events"] => Request::Events { last: None },
        ["events", n] => Request::Events {
            last: Some(n.parse().map_err(|_| format!("not a count: {n:?}"))?),
        },
        ["checkpoint"] => Request::Checkpoint { digest: false },
        ["rollback"] => Request::Rollback {
            id: None,
            digest: false,
        },
        ["rollback", n] => Request::Rollback {
            id: Some(id(n)?),
            digest: false,
        },
        ["release", n] => Request::Release { id: id(n)? },
        ["rescue-enable", name, on] => Request::RescueEnable {
            name: name.to_string(),
            enabled: match *on {
                "on" => true,
                "off" => false,
                other => return Err(format!("expected on or off, not {other:?}")),
            },
        },
        ["inject", spec] => Request::Inject {
            spec: spec.to_string(),
        },
        [cmd, ..] => {
            return Err(format!(
                "unknown or malformed command {cmd:?} (try `monitor help`)"
            ))
        }
    };
    Ok(Some(req))
}

/// Run one monitor command; the text gdb shows.
pub(crate) fn run(target: &mut SandboxTarget<'_>, line: &str) -> String {
    let windows_only = line.split_whitespace().next() == Some("windows");
    let req = match parse(line) {
        Ok(Some(r)) => r,
        Ok(None) => return HELP.to_string(),
        Err(e) => return format!("error: {e}"),
    };
    let reply = if target.is_stopped() {
        // Checkpoint operations stop the world themselves: the session lends it to them
        // with every thread held.
        match target.with_world_released(|shared| crate::sandbox::handle_request(shared, req)) {
            Ok(r) => r,
            Err(e) => Err(e.to_string()),
        }
    } else {
        crate::sandbox::handle_request(target.shared, req)
    };
    match reply {
        Ok(v) if windows_only => {
            let w = v.get("windows").cloned().unwrap_or_default();
            serde_json::to_string_pretty(&w).unwrap_or_default()
        }
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(e) => format!("error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_are_explained() {
        assert!(matches!(
            parse("checkpoint"),
            Ok(Some(Request::Checkpoint { .. }))
        ));
        assert!(matches!(
            parse(" rollback 3 "),
            Ok(Some(Request::Rollback { id: Some(3), .. }))
        ));
        assert!(matches!(
            parse("release 9"),
            Ok(Some(Request::Release { id: 9 }))
        ));
        assert!(matches!(
            parse("events 5"),
            Ok(Some(Request::Events { last: Some(5) }))
        ));
        assert!(matches!(parse("help"), Ok(None)));
        assert!(parse("rollback x")
            .expect_err("refused")
            .contains("checkpoint id"));
        assert!(parse("release")
            .expect_err("refused")
            .contains("unknown or malformed"));
        assert!(parse("rescue-enable p maybe")
            .expect_err("refused")
            .contains("on or off"));
        assert!(parse("reboot")
            .expect_err("refused")
            .contains("monitor help"));
    }
}
