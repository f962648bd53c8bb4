//! A small filesystem for the cache directory: a tmpfs of a few MiB mounted on a fresh
//! temporary directory, which the tests fill up, resize and turn read-only. Mounting needs root
//! and mount(8); where either is missing the test fails loudly instead of passing silently.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct SmallDisk {
    path: PathBuf,
}

fn mount(args: &[&str]) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` bytes; returns it and the directory it is mounted on (the cache
    /// directory to give TerraPeak).
    pub fn mount(size: u64) -> (SmallDisk, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let opts = format!("size={size},mode=0755");
        if let Err(e) = mount(&[
            "-t",
            "tmpfs",
            "-o",
            &opts,
            "terrapeak-test",
            path.to_str().unwrap(),
        ]) {
            panic!(
                "the small-disk tests need a tmpfs mounted on {} and could not mount one ({e}); \
                 they must run as root on a machine that allows mount(8)",
                path.display()
            );
        }
        (SmallDisk { path }, dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the filesystem's size: more room frees space without deleting anything.
    pub fn resize(&self, size: u64) {
        self.remount(&format!("remount,size={size}"));
    }

    pub fn set_read_only(&self, read_only: bool) {
        self.remount(if read_only {
            "remount,ro"
        } else {
            "remount,rw"
        });
    }

    fn remount(&self, opts: &str) {
        // A file still open for writing makes `remount,ro` busy for a moment.
        let mut last = String::new();
        for _ in 0..50 {
            match mount(&["-o", opts, self.path.to_str().unwrap()]) {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("mount -o {opts} {}: {last}", self.path.display());
    }

    /// Fills every free byte with a file outside TerraPeak's folders (again, after space was
    /// freed); returns the bytes it added.
    pub fn fill(&self) -> u64 {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let block = vec![0xa5u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the small disk: {e}"),
            }
        }
        // The last partial pages too.
        while let Ok(n) = f.write(&block[..512]) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        written
    }

    /// Removes what [`SmallDisk::fill`] wrote.
    pub fn unfill(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }

    /// Every file under the cache directory's `staging/`.
    pub fn staged(&self) -> Vec<String> {
        std::fs::read_dir(self.path.join("staging"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    // The readiness probe's spool file lives for a moment.
                    .filter(|n| !n.starts_with("probe-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Files on this disk that were removed but that this process (TerraPeak runs in it) still
    /// holds open: their space comes back only when the last handle is closed.
    pub fn held_open(&self) -> Vec<String> {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return Vec::new();
        };
        fds.filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .filter(|t| t.starts_with(self.path.to_str().unwrap()) && t.ends_with(" (deleted)"))
            .collect()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily, so a file TerraPeak still holds open cannot keep the mount behind.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}
