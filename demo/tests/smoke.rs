//! `storinator-demo` as a person runs it: it completes, the restored folder is identical (the
//! demo checks that itself and fails otherwise), and it prints its summary.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_completes_on_a_small_folder() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("sample");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(src.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
    let out = dir.path().join("out");
    let err = dir.path().join("err");
    let mut child = Command::new(env!("CARGO_BIN_EXE_storinator-demo"))
        .arg("--path")
        .arg(&src)
        .args(["--bandwidth", "0"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out).unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    assert!(stdout.contains("summary"), "{stdout}");
    assert!(stdout.contains("/backup"), "{stdout}");
}
