//! RESP (redis) and CRLF-line client helpers shared by the integration tests.

use std::io::BufRead;

/// The first bytes of `b`, printable, for messages.
pub fn short(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned();
    if b.len() > 80 {
        format!("{s:?}... ({} bytes)", b.len())
    } else {
        format!("{s:?}")
    }
}

/// An InvalidData error with `msg`.
pub fn wrong(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// An UnexpectedEof error saying `what`.
pub fn eof(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what.to_string())
}

/// A line ending in CRLF, without it. EOF (also mid-line) is UnexpectedEof.
pub fn read_crlf(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_until(b'\n', &mut v)?;
    if !v.ends_with(b"\n") {
        return Err(eof("connection closed"));
    }
    if !v.ends_with(b"\r\n") {
        return Err(wrong(format!("line without CR: {}", short(&v))));
    }
    v.truncate(v.len() - 2);
    Ok(v)
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// A RESP reply.
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// A RESP command: an array of bulk strings.
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// One RESP reply (arrays read recursively).
pub fn read_resp(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let line = read_crlf(r)?;
    let (kind, rest) = line
        .split_first()
        .ok_or_else(|| wrong("empty RESP line".into()))?;
    let text = String::from_utf8_lossy(rest).into_owned();
    let num = || {
        text.parse::<i64>()
            .map_err(|_| wrong(format!("bad RESP number {}", short(&line))))
    };
    Ok(match kind {
        b'+' => Resp::Simple(text.clone()),
        b'-' => Resp::Error(text.clone()),
        b':' => Resp::Int(num()?),
        b'$' => {
            let n = num()?;
            if n < 0 {
                Resp::Bulk(None)
            } else {
                let mut data = vec![0u8; n as usize + 2];
                r.read_exact(&mut data)?;
                if !data.ends_with(b"\r\n") {
                    return Err(wrong(format!("bulk of {n} bytes not followed by CRLF")));
                }
                data.truncate(n as usize);
                Resp::Bulk(Some(data))
            }
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                Resp::Array(None)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(read_resp(r)?);
                }
                Resp::Array(Some(items))
            }
        }
        _ => return Err(wrong(format!("not a RESP reply: {}", short(&line)))),
    })
}
