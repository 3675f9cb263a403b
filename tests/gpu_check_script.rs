//! `tools/gpu-check.sh` end to end on the CPU: the script only ever runs on a lent GPU
//! machine, where a broken control flow or summary table would waste scarce device time. Here
//! it runs on a folder holding a stand-in test executable and a `bin/genius-engine` wrapper
//! that calls this build's engine with `--device cpu`, a tiny random model and small sizes, and
//! the test checks that every part ran and that the summary table has the rows it should
//! (the decode table with its host-time column, training, log-probs, the 2-round run). The
//! peers (HF transformers, PyTorch) are off: they need the GPU machine's Python packages.

use std::path::Path;
use std::process::Command;

/// The engine wrapper: `--device` becomes `cpu`, every `--model` the tiny LLaMA, and the
/// sizes small enough for two cores (rollout batches, new tokens, training tokens, iterations).
const WRAPPER: &str = r#"#!/usr/bin/env bash
real="$GENIUS_CHECK_REAL_ENGINE"
args=()
what=""
[[ ${1:-} == bench ]] && what=${2:-}
# A failure on demand: `GENIUS_CHECK_FAIL=rollout` fails every `bench rollout`.
if [[ -n $what && $what == "${GENIUS_CHECK_FAIL:-}" ]]; then
  echo "error: failing $what on purpose" >&2
  exit 1
fi
skip=""
for a in "$@"; do
  if [[ -n $skip ]]; then
    case $skip in
      --device) args+=(cpu) ;;
      --model) args+=(random:llama-tiny) ;;
      --new-tokens) args+=(4) ;;
      --iters) args+=(1) ;;
      --batches) if [[ $what == rollout ]]; then args+=(2,3); else args+=("$a"); fi ;;
      --tokens)
        case $what in
          train) args+=(32) ;;
          forward) args+=(64) ;;
          *) args+=("$a") ;;
        esac ;;
    esac
    skip=""
    continue
  fi
  case $a in
    --device|--model|--new-tokens|--iters|--batches|--tokens) args+=("$a"); skip=$a ;;
    *) args+=("$a") ;;
  esac
done
# The foresight prompt must fit the tiny model's context.
[[ $what == rollout ]] && args+=(--fork-prompt-tokens 64)
exec "$real" "${args[@]}"
"#;

/// A stand-in for a prebuilt GPU test executable: libtest's summary line and one skip.
const FAKE_TESTS: &str = r#"#!/usr/bin/env bash
echo "test first ... ok"
echo "SKIPPED: second (stand-in)"
echo "test second ... ok"
echo "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s"
"#;

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Runs tools/gpu-check.sh on a fresh folder (stand-in tests, the wrapper) with `env`; returns
/// (success, stdout, a context string with the logs for failure messages).
fn run_gpu_check(name: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&tmp);
    let dir = tmp.join("gpu-bin");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    write_executable(&dir.join("cuda_stand_in"), FAKE_TESTS);
    write_executable(&dir.join("bin/genius-engine"), WRAPPER);
    let out = tmp.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("tools/gpu-check.sh"))
        .arg(&dir)
        .current_dir(root)
        .env(
            "GENIUS_CHECK_REAL_ENGINE",
            env!("CARGO_BIN_EXE_genius-engine"),
        )
        .env("OUT", &out)
        .env("GPU_PEER", "0")
        .env("GPU_BENCH_BATCHES", "2,3")
        .env("GPU_CHECK_BUDGET", "100000");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let result = cmd.output().expect("runs bash tools/gpu-check.sh");
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&result.stderr);
    let logs =
        |name: &str| std::fs::read_to_string(out.join("logs").join(name)).unwrap_or_default();
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{stderr}\nbench.log:\n{}\ntrain.log:\n{}",
        logs("bench.log"),
        logs("train.log")
    );
    assert!(
        !stdout.contains("Traceback"),
        "the summary crashed: {context}"
    );
    (result.status.success(), stdout, context)
}

#[test]
fn gpu_check_runs_every_part_and_prints_its_tables_on_the_cpu() {
    let (ok, stdout, context) = run_gpu_check("gpu-check-script", &[]);
    assert!(ok, "gpu-check failed: {context}");
    // The tests table: the stand-in's two tests, one of them a skip.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("cuda_stand_in"))
        .unwrap_or_else(|| panic!("no row for the stand-in: {context}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&fields[1..4], &["1", "0", "1"], "{row}");
    assert!(row.ends_with("ok"), "{row}");
    // The decode table (both batch sizes, with the host time), the variants, training,
    // log-probs and the run.
    for want in [
        "rollout on cpu",
        "host ms",
        "foresight: 8 forks",
        "prefill 64 tokens",
        "GENIUS_CUDA_PA_TC=0:",
        "GENIUS_CUDA_SKINNY_GEMM=1:",
        "x baseline)",
        "A/B at 3 sequences: ",
        "train step 8 x 32 tokens",
        "log-probs 1024 rows",
        "run --device cuda, 2 rounds",
    ] {
        assert!(
            stdout.contains(want),
            "no '{want}' in the summary: {context}"
        );
    }
    assert!(!stdout.contains("FAILED"), "{context}");
    let decode_rows = stdout
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && (f[0] == "2" || f[0] == "3") && f[1].parse::<f64>().is_ok()
        })
        .count();
    assert_eq!(
        decode_rows, 2,
        "decode rows for 2 and 3 sequences: {context}"
    );
}

#[test]
fn a_failed_decode_benchmark_fails_the_check() {
    // Every `bench rollout` fails (the main one, its rerun without graphs, the variants); the
    // rest still runs and reports, and the exit status says something failed.
    let (ok, stdout, context) =
        run_gpu_check("gpu-check-script-fail", &[("GENIUS_CHECK_FAIL", "rollout")]);
    assert!(
        !ok,
        "gpu-check passed with a failed decode benchmark: {context}"
    );
    assert!(stdout.contains("bench rollout: no result"), "{context}");
    // Nothing else failed: the tests' row is ok, training and the run completed.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("cuda_stand_in"))
        .unwrap_or_else(|| panic!("no row for the stand-in: {context}"));
    assert!(row.ends_with("ok"), "{row}");
    assert!(stdout.contains("train step 8 x 32 tokens"), "{context}");
    assert!(stdout.contains("run --device cuda, 2 rounds"), "{context}");
}
