//! The `relay` binary's command line, run as a real process.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

fn run(args: &[&str], cwd: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(RELAY)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn id_creates_a_private_key_once_and_prints_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = run(&["id", "--data-dir", "d"], dir.path());
    assert_eq!(code, 0);
    let key = out.trim();
    assert_eq!(key.len(), 52, "{out:?}");
    assert_eq!(out.lines().count(), 1);
    let (_, again, _) = run(&["id", "--data-dir", "d"], dir.path());
    assert_eq!(again.trim(), key);
    let mode = std::fs::metadata(dir.path().join("d/node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn check_config_accepts_the_example_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/relay.toml");
    let (code, out, _) = run(&["check-config", example], dir.path());
    assert_eq!(code, 0, "{out}");

    let cases = [
        ("[node]\nlisten = 5\n", "node.listen", ":2"),
        ("[node]\nbogus = 1\n", "bogus", ":2"),
        (
            "[limits]\nmax_payload = 1048576\nmax_frame = 1024\n",
            "limits.max_frame",
            "line 3",
        ),
    ];
    for (i, (text, field, line)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let (code, _, err) = run(&["check-config", f.to_str().unwrap()], dir.path());
        assert_eq!(code, 1, "{text}");
        assert!(err.contains(field) && err.contains(line), "{text}: {err}");
    }
}

#[test]
fn a_bad_config_is_refused_at_start_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.toml");
    std::fs::write(&f, "[security]\nverify = \"sometimes\"\n").unwrap();
    let (code, _, err) = run(&["--config", f.to_str().unwrap()], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("security.verify"), "{err}");
}

#[test]
fn runs_with_defaults_says_what_next_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(RELAY)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("relay ready: key="), "{line}");
    assert!(line.contains("data=relay-data (new key)"), "{line}");
    assert!(line.contains("cell listen --relay"), "{line}");
    assert!(dir.path().join("relay-data/node.key").exists());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            child.kill().unwrap();
            panic!("relay did not stop within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
