//! A sandbox's state tree seen from inside the sandbox, through `openshell sandbox exec`: the
//! shell scripts the openshell driver runs there (a listing with SHA-256 digests, and a
//! metadata fix-up) and the parsing of what they print.
//!
//! Why: the CLI's `tar` pipeline does not carry everything (its download drops sub-second and
//! directory mtimes and setuid/setgid/sticky bits; its upload splits hard links and keeps
//! whole-second mtimes). A listing taken inside the sandbox describes the *source* — the
//! sandbox's own files, digests included — so a copy damaged on the way is told from the
//! original, and the metadata the pipeline drops is put back from it.
//!
//! The exec channel: the argv is a list of strings (no NUL, nothing over 256 KiB) that the
//! gateway joins into one shell command, so names — which may not be UTF-8 — never go in the
//! argv: they come back on stdout and go in on stdin, NUL-separated. stdin is capped (4 MiB
//! per request, message framing included), so a long fix-up is cut into several calls. A
//! stream that ends without an exit status makes the CLI exit 0: every script prints
//! [`END`] as its last act, and output without it is never trusted.
//!
//! Needs, inside the sandbox: `sh`, GNU `find` (`-printf`), `sha256sum -z`, `xargs -0`,
//! `dd iflag=fullblock`, `chmod`, `touch -d @S.N`, `ln` (GNU coreutils and findutils).

use std::collections::HashMap;

use crate::host::fstree::{check_rel, escaping_link, Kind, Node};
use crate::util::sha256_hex;

use super::openshell::SANDBOX_STATE_PATH;

/// The last line every script prints, after all its work succeeded.
pub const END: &[u8] = b"NEMOCLAW-END\n";
/// Separates the metadata records from the digests in a listing.
const DIGESTS: &[u8] = b"NEMOCLAW-DIGESTS";
/// The most stdin bytes one fix-up call carries (the request limit is 4 MiB with framing).
pub const MAX_STDIN: usize = 3 << 20;

/// The listing script: `sh -c LISTING nemoclaw [digests]`. Prints, NUL-terminated, for every
/// entry below the state root: `TYPE MODE MTIME SIZE DEV:INO NLINK PATH` then the symlink
/// target (empty for others); with `digests`, then `NEMOCLAW-DIGESTS` and `sha256sum -z` of every
/// regular file; then [`END`]. (No single quote in it: the gateway single-quotes the argv.)
pub fn listing_script() -> String {
    format!(
        "cd {SANDBOX_STATE_PATH} || exit 90; \
         find . -mindepth 1 -printf \"%y %m %T@ %s %D:%i %n %P\\0%l\\0\" || exit 91; \
         if [ \"$1\" = digests ]; then printf \"NEMOCLAW-DIGESTS\\0\"; \
         find . -mindepth 1 -type f -exec sha256sum -z -- {{}} + || exit 92; fi; \
         printf \"NEMOCLAW-END\\n\""
    )
}

/// Sets the mtimes of a `time` section in one process when the sandbox has `python3`
/// (`os.utime` with integer nanoseconds, not following symlinks): `touch` costs a process per
/// file, seconds for a few thousand files. `@S.N` always has nine fraction digits, so the
/// digits without the dot are the nanoseconds.
const PY_TIMES: &str = "import os,sys; d=sys.stdin.buffer.read().split(bytes(1)); \
     [os.utime(d[i+1], ns=(int(d[i][1:].replace(b\\\".\\\", b\\\"\\\")),)*2, follow_symlinks=False) \
     for i in range(0, len(d)-1, 2)]";

/// The fix-up script: `sh -c FIXUP nemoclaw OP LEN [OP LEN]...`, stdin the concatenated
/// sections. Each section of LEN bytes holds NUL-terminated argument pairs for one operation:
/// `link` (`ln -f -- FIRST OTHER`), `mode` (`chmod -- MODE PATH`) or `time`
/// (`touch -c -h -d @S.N PATH`, or all at once in `python3` when there is one: `PY_TIMES`),
/// applied in order. Then [`END`].
pub fn fixup_script() -> String {
    format!(
        "cd {SANDBOX_STATE_PATH} || exit 90; \
         py=; command -v python3 >/dev/null 2>&1 && py=1; \
         while [ $# -gt 1 ]; do op=$1; n=$2; shift 2; \
         case $op in link) cmd=\"ln -f --\";; mode) cmd=\"chmod --\";; \
         time) cmd=\"touch -c -h -d\";; *) exit 94;; esac; \
         if [ $op = time ] && [ -n \"$py\" ]; then \
         dd bs=$n count=1 iflag=fullblock status=none | python3 -c \"{PY_TIMES}\" || exit 95; \
         else dd bs=$n count=1 iflag=fullblock status=none | xargs -0 -r -n 2 $cmd || exit 93; fi; \
         done; printf \"NEMOCLAW-END\\n\""
    )
}

/// The output of a script without its [`END`] line; `None` when it did not finish (the
/// stream was cut, or the output was cut at its size bound).
pub fn finished(out: &[u8]) -> Option<&[u8]> {
    out.strip_suffix(END)
}

/// `-printf %T@` (`1600000000.1234567890`, maybe negative) in nanoseconds.
fn parse_time(t: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(t).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let ns = secs.checked_mul(1_000_000_000)?.checked_add(digits.parse::<i64>().ok()?)?;
    Some(if neg { -ns } else { ns })
}

/// `@S.N` for `touch -d`: the sign applies to the whole number.
pub fn touch_time(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let a = ns.unsigned_abs();
    format!("@{sign}{}.{:09}", a / 1_000_000_000, a % 1_000_000_000)
}

/// Depth-first, siblings by name: the order of [`crate::host::fstree::walk`].
fn walk_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.split(|c| *c == b'/').cmp(b.split(|c| *c == b'/'))
}

/// Parse a listing (the output of [`listing_script`], [`END`] included) into nodes in walk
/// order, hard links named by their first path, every file with its digest when `digests`.
/// Refuses what a backup refuses: special files, unsafe names, symlinks that leave the tree.
pub fn parse_listing(out: &[u8], digests: bool) -> Result<Vec<Node>, String> {
    let body = finished(out).ok_or("the listing ended before its end marker (cut short)")?;
    let mut tokens: Vec<&[u8]> = body.split(|b| *b == 0).collect();
    // Every record is NUL-terminated: the last piece is empty.
    if tokens.pop() != Some(&b""[..]) && !body.is_empty() {
        return Err("the listing does not end with a complete record".into());
    }
    let mut it = tokens.into_iter();
    let mut nodes = Vec::new();
    let mut inodes: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut seen_digests = false;
    while let Some(meta) = it.next() {
        if meta == DIGESTS {
            seen_digests = true;
            break;
        }
        let bad = || format!("unreadable listing record `{}`", String::from_utf8_lossy(meta));
        let link = it.next().ok_or_else(bad)?;
        let f: Vec<&[u8]> = meta.splitn(7, |b| *b == b' ').collect();
        let [ty, mode, mtime, size, devino, nlink, rel] = f[..] else { return Err(bad()) };
        let num = |v: &[u8], radix| {
            std::str::from_utf8(v).ok().and_then(|s| u64::from_str_radix(s, radix).ok())
        };
        let mode = num(mode, 8).ok_or_else(bad)? as u32 & 0o7777;
        let mtime_ns = parse_time(mtime).ok_or_else(bad)?;
        let size = num(size, 10).ok_or_else(bad)?;
        let nlink = num(nlink, 10).ok_or_else(bad)?;
        check_rel(rel)
            .map_err(|why| format!("unsafe path `{}`: {why}", String::from_utf8_lossy(rel)))?;
        let shown = String::from_utf8_lossy(rel);
        let kind = match ty {
            b"d" => Kind::Dir,
            b"f" => Kind::File,
            b"l" => Kind::Symlink(link.to_vec()),
            _ => {
                return Err(format!(
                    "refusing {shown}: not a regular file, directory or symlink (type {})",
                    String::from_utf8_lossy(ty)
                ))
            }
        };
        if kind == Kind::File && nlink > 1 {
            inodes.insert(devino.to_vec(), 0);
        }
        let sha256 = match &kind {
            Kind::Symlink(t) => Some(sha256_hex(t)),
            _ => None,
        };
        let size = match &kind {
            Kind::Dir => 0,
            Kind::Symlink(t) => t.len() as u64,
            Kind::File => size,
        };
        nodes.push((
            Node { rel: rel.to_vec(), kind, mode, mtime_ns, size, sha256, hardlink: None },
            (nlink > 1).then(|| devino.to_vec()),
        ));
    }
    if digests {
        if !seen_digests {
            return Err("the listing has no digests".into());
        }
        let mut sums: HashMap<&[u8], &[u8]> = HashMap::new();
        for t in it {
            let bad = || format!("unreadable digest record `{}`", String::from_utf8_lossy(t));
            if t.len() < 64 + 4 || !t[..64].iter().all(u8::is_ascii_hexdigit) {
                return Err(bad());
            }
            let rest = &t[64..];
            let name = rest
                .strip_prefix(b"  ./")
                .or_else(|| rest.strip_prefix(b" *./"))
                .ok_or_else(bad)?;
            sums.insert(name, &t[..64]);
        }
        for (n, _) in &mut nodes {
            if n.kind == Kind::File {
                let sum = sums.get(n.rel.as_slice()).ok_or_else(|| {
                    format!("the listing has no digest for {}", String::from_utf8_lossy(&n.rel))
                })?;
                n.sha256 = Some(String::from_utf8_lossy(sum).to_ascii_lowercase());
            }
        }
    } else if seen_digests || it.next().is_some() {
        return Err("unexpected digests in the listing".into());
    }
    nodes.sort_by(|a, b| walk_order(&a.0.rel, &b.0.rel));
    // Names of one inode: every later one points at the first in walk order.
    let mut first: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(nodes.len());
    for (mut n, devino) in nodes {
        if let (Some(key), Kind::File) = (devino, &n.kind) {
            match first.get(&key) {
                Some(f) => n.hardlink = Some(f.clone()),
                None => {
                    first.insert(key, n.rel.clone());
                }
            }
        }
        out.push(n);
    }
    if let Some((rel, t, why)) = escaping_link(&out) {
        return Err(format!(
            "refusing symlink {} → {}: {why}",
            String::from_utf8_lossy(rel),
            String::from_utf8_lossy(t)
        ));
    }
    Ok(out)
}

/// One fix-up operation kind, in the order they must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `ln -f -- FIRST OTHER`: make OTHER a name of FIRST's inode.
    Link,
    /// `chmod -- MODE PATH` (five octal digits, so a directory's setgid bit is cleared too).
    Mode,
    /// `touch -c -h -d @S.N PATH` (sets the mtime, never follows or creates).
    Time,
}

impl Op {
    fn word(self) -> &'static str {
        match self {
            Op::Link => "link",
            Op::Mode => "mode",
            Op::Time => "time",
        }
    }
}

fn dot(rel: &[u8]) -> Vec<u8> {
    let mut v = b"./".to_vec();
    v.extend_from_slice(rel);
    v
}

/// What to run so the tree listed as `got` carries the metadata of `want` (both in walk
/// order): hard links first, then file modes, then file and symlink mtimes, then directory
/// mtimes and modes, deepest first (a directory's mtime changes while its entries do, and a
/// mode without `x` would stop the rest). Entries missing from `got` or of another type are
/// left alone: verification reports them.
pub fn fixups(want: &[Node], got: &[Node]) -> Vec<(Op, Vec<u8>, Vec<u8>)> {
    let by: HashMap<&[u8], &Node> = got.iter().map(|n| (n.rel.as_slice(), n)).collect();
    let group = |rel: &[u8]| -> Option<Vec<u8>> {
        by.get(rel).map(|n| n.hardlink.clone().unwrap_or_else(|| n.rel.clone()))
    };
    let (mut links, mut modes, mut times, mut dirs) = (vec![], vec![], vec![], vec![]);
    for w in want {
        let Some(g) = by.get(w.rel.as_slice()) else { continue };
        let same_kind = match (&w.kind, &g.kind) {
            (Kind::Symlink(_), Kind::Symlink(_)) => true,
            (a, b) => a == b,
        };
        if !same_kind {
            continue;
        }
        let mode = format!("{:05o}", w.mode & 0o7777).into_bytes();
        let time = touch_time(w.mtime_ns).into_bytes();
        if w.kind == Kind::Dir {
            if g.mtime_ns != w.mtime_ns {
                dirs.push((Op::Time, time, dot(&w.rel)));
            }
            if g.mode != w.mode {
                dirs.push((Op::Mode, mode, dot(&w.rel)));
            }
            continue;
        }
        if let Some(first) = &w.hardlink {
            if group(first).is_some() && group(first) != group(&w.rel) {
                // The other name becomes the first's inode: its mode and mtime with it.
                links.push((Op::Link, dot(first), dot(&w.rel)));
                continue;
            }
        }
        if w.kind == Kind::File && g.mode != w.mode {
            modes.push((Op::Mode, mode, dot(&w.rel)));
        }
        if g.mtime_ns != w.mtime_ns {
            times.push((Op::Time, time, dot(&w.rel)));
        }
    }
    // Deepest first; for one directory its mtime before its mode.
    dirs.reverse();
    let mut d2 = Vec::with_capacity(dirs.len());
    let mut i = 0;
    while i < dirs.len() {
        if i + 1 < dirs.len() && dirs[i].2 == dirs[i + 1].2 {
            d2.push(dirs[i + 1].clone());
            d2.push(dirs[i].clone());
            i += 2;
        } else {
            d2.push(dirs[i].clone());
            i += 1;
        }
    }
    links.into_iter().chain(modes).chain(times).chain(d2).collect()
}

/// The fix-up `ops` as calls: each the argv after the script (`OP LEN`...) and its stdin, at
/// most [`MAX_STDIN`] bytes, the operations kept in order.
pub fn fixup_calls(ops: &[(Op, Vec<u8>, Vec<u8>)], max: usize) -> Vec<(Vec<String>, Vec<u8>)> {
    let mut calls = Vec::new();
    let (mut args, mut stdin): (Vec<String>, Vec<u8>) = (Vec::new(), Vec::new());
    let mut section: Option<(Op, usize)> = None;
    let close = |args: &mut Vec<String>, section: &mut Option<(Op, usize)>, end: usize| {
        if let Some((op, start)) = section.take() {
            args.push(op.word().to_owned());
            args.push((end - start).to_string());
        }
    };
    for (op, a, b) in ops {
        let len = a.len() + b.len() + 2;
        if !stdin.is_empty() && stdin.len() + len > max {
            close(&mut args, &mut section, stdin.len());
            calls.push((std::mem::take(&mut args), std::mem::take(&mut stdin)));
        }
        if section.is_some_and(|(s, _)| s != *op) {
            close(&mut args, &mut section, stdin.len());
        }
        if section.is_none() {
            section = Some((*op, stdin.len()));
        }
        stdin.extend_from_slice(a);
        stdin.push(0);
        stdin.extend_from_slice(b);
        stdin.push(0);
    }
    if !stdin.is_empty() {
        close(&mut args, &mut section, stdin.len());
        calls.push((args, stdin));
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_have_no_single_quote_no_nul_and_one_line() {
        for s in [listing_script(), fixup_script()] {
            assert!(!s.contains('\'') && !s.contains('\0') && !s.contains('\n'), "{s}");
        }
        assert!(listing_script().contains(r#"-printf "%y %m %T@ %s %D:%i %n %P\0%l\0""#));
    }

    #[test]
    fn times_parse_and_print_to_the_nanosecond() {
        assert_eq!(parse_time(b"1600000000.1234567890"), Some(1_600_000_000_123_456_789));
        assert_eq!(parse_time(b"5"), Some(5_000_000_000));
        assert_eq!(parse_time(b"-2.5"), Some(-2_500_000_000));
        assert_eq!(parse_time(b"x"), None);
        assert_eq!(touch_time(1_600_000_000_000_000_001), "@1600000000.000000001");
        assert_eq!(touch_time(-2_500_000_000), "@-2.500000000");
    }

    fn listing(records: &[(&str, &[u8], &[u8])], sums: Option<&[(&[u8], &str)]>) -> Vec<u8> {
        let mut v = Vec::new();
        for (meta, rel, link) in records {
            v.extend_from_slice(meta.as_bytes());
            v.extend_from_slice(rel);
            v.push(0);
            v.extend_from_slice(link);
            v.push(0);
        }
        if let Some(sums) = sums {
            v.extend_from_slice(DIGESTS);
            v.push(0);
            for (rel, sum) in sums {
                v.extend_from_slice(sum.as_bytes());
                v.extend_from_slice(b"  ./");
                v.extend_from_slice(rel);
                v.push(0);
            }
        }
        v.extend_from_slice(END);
        v
    }

    const A: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn a_listing_parses_in_walk_order_with_hard_links_and_digests() {
        let out = listing(
            &[
                ("f 644 1.5 0 1:9 2 ", b"w/b", b""),
                ("d 2775 2.0 4096 1:3 2 ", b"w", b""),
                ("l 777 3.0 1 1:4 1 ", b"w/l", b"b"),
                ("f 600 4.0 0 1:9 2 ", b"a\xff", b""),
            ],
            Some(&[(b"w/b", A), (b"a\xff", A)]),
        );
        let n = parse_listing(&out, true).unwrap();
        let rels: Vec<&[u8]> = n.iter().map(|n| n.rel.as_slice()).collect();
        assert_eq!(rels, [&b"a\xff"[..], b"w", b"w/b", b"w/l"]);
        assert_eq!((n[1].kind.clone(), n[1].mode), (Kind::Dir, 0o2775));
        assert_eq!(n[2].hardlink.as_deref(), Some(&b"a\xff"[..]));
        assert_eq!(n[2].mtime_ns, 1_500_000_000);
        assert_eq!(n[2].sha256.as_deref(), Some(A));
        assert_eq!(n[3].kind, Kind::Symlink(b"b".to_vec()));
    }

    #[test]
    fn a_listing_cut_short_or_incomplete_is_refused() {
        let out = listing(&[("f 644 1.5 0 1:9 1 ", b"a", b"")], Some(&[(b"a", A)]));
        assert!(parse_listing(&out[..out.len() - 1], true).unwrap_err().contains("end marker"));
        let out = listing(&[("f 644 1.5 0 1:9 1 ", b"a", b"")], Some(&[]));
        assert!(parse_listing(&out, true).unwrap_err().contains("no digest for a"));
        let out = listing(&[("f 644 1.5 0 1:9 1 ", b"a", b"")], None);
        assert!(parse_listing(&out, true).is_err());
        assert_eq!(parse_listing(&out, false).unwrap().len(), 1);
        let out = listing(&[("p 644 1.5 0 1:9 1 ", b"fifo", b"")], None);
        assert!(parse_listing(&out, false).unwrap_err().contains("refusing fifo"));
        let out = listing(&[("l 777 1.5 2 1:9 1 ", b"up", b"../x")], None);
        assert!(parse_listing(&out, false).unwrap_err().contains("refusing symlink up"));
    }

    fn node(rel: &str, kind: Kind, mode: u32, mtime_ns: i64, hardlink: Option<&str>) -> Node {
        Node {
            rel: rel.as_bytes().to_vec(),
            kind,
            mode,
            mtime_ns,
            size: 0,
            sha256: None,
            hardlink: hardlink.map(|h| h.as_bytes().to_vec()),
        }
    }

    #[test]
    fn fixups_link_then_modes_then_times_then_directories_deepest_first() {
        let want = [
            node("d", Kind::Dir, 0o2750, 10, None),
            node("d/a", Kind::File, 0o644, 11, None),
            node("d/b", Kind::File, 0o644, 11, Some("d/a")),
            node("d/e", Kind::Dir, 0o700, 12, None),
            node("d/l", Kind::Symlink(b"a".to_vec()), 0o777, 13, None),
        ];
        let got = [
            node("d", Kind::Dir, 0o750, 10_000, None),
            node("d/a", Kind::File, 0o600, 11, None),
            node("d/b", Kind::File, 0o644, 11, None),
            node("d/e", Kind::Dir, 0o700, 99, None),
            node("d/l", Kind::Symlink(b"a".to_vec()), 0o777, 0, None),
        ];
        let ops = fixups(&want, &got);
        let shown: Vec<String> = ops
            .iter()
            .map(|(o, a, b)| {
                format!(
                    "{} {} {}",
                    o.word(),
                    String::from_utf8_lossy(a),
                    String::from_utf8_lossy(b)
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "link ./d/a ./d/b",
                "mode 00644 ./d/a",
                "time @0.000000013 ./d/l",
                "time @0.000000012 ./d/e",
                "time @0.000000010 ./d",
                "mode 02750 ./d",
            ]
        );
        let calls = fixup_calls(&ops, MAX_STDIN);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, ["link", "12", "mode", "12", "time", "55", "mode", "10"]);
        let small = fixup_calls(&ops, 30);
        assert!(small.len() > 1 && small.iter().all(|(_, s)| s.len() <= 30));
        let joined: Vec<u8> = small.iter().flat_map(|(_, s)| s.clone()).collect();
        assert_eq!(joined, calls[0].1, "cutting keeps the order");
    }
}
