//! Bad checkpoints, configs and inputs: each gives an error that names the file and the
//! problem, through the library and through the binary (exit 1, no panic).

mod common;

use common::*;
use genius_engine::model::safetensors::{Dtype, SafetensorsFile};
use genius_engine::model::{ModelConfig, load_model};
use std::path::Path;
use std::process::Command;

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

fn write_raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &tiny_llama_config(), 1, Dtype::F32);
    let path = dir.path().join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    for cut in [3, 8, 20, full.len() / 2, full.len() - 1] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let msg = err_of(SafetensorsFile::open(&path));
        assert_mentions(&msg, &["model.safetensors"]);
        assert!(
            msg.contains("truncated") || msg.contains("past the end"),
            "cut {cut}: {msg}"
        );
    }
}

#[test]
fn offsets_past_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_raw_safetensors(
        &path,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#,
        24,
    );
    let msg = err_of(SafetensorsFile::open(&path));
    assert_mentions(&msg, &["model.safetensors", "'b'", "past the end"]);
}

#[test]
fn unknown_and_unsupported_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_raw_safetensors(
        &path,
        r#"{"w":{"dtype":"Q9","shape":[2],"data_offsets":[0,4]}}"#,
        4,
    );
    assert_mentions(
        &err_of(SafetensorsFile::open(&path)),
        &["model.safetensors", "'w'", "unknown dtype 'Q9'"],
    );
    write_raw_safetensors(
        &path,
        r#"{"w":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#,
        16,
    );
    assert_mentions(
        &err_of(SafetensorsFile::open(&path)),
        &["model.safetensors", "unsupported dtype I64"],
    );
}

#[test]
fn shape_and_size_disagree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_raw_safetensors(
        &path,
        r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        8,
    );
    assert_mentions(
        &err_of(SafetensorsFile::open(&path)),
        &["model.safetensors", "needs 12 bytes"],
    );
}

#[test]
fn config_missing_field_or_unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let mut v = tiny_llama_config().to_hf_value();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, v.to_string()).unwrap();
    assert_mentions(
        &err_of(ModelConfig::from_hf_json(&path)),
        &["config.json", "missing field 'hidden_size'"],
    );

    let mut v = tiny_llama_config().to_hf_value();
    v["model_type"] = "mamba".into();
    std::fs::write(&path, v.to_string()).unwrap();
    assert_mentions(
        &err_of(ModelConfig::from_hf_json(&path)),
        &["config.json", "unsupported architecture", "mamba"],
    );

    std::fs::write(&path, "{not json").unwrap();
    assert_mentions(
        &err_of(ModelConfig::from_hf_json(&path)),
        &["config.json", "not valid JSON"],
    );

    for (key, value, expect) in [
        (
            "num_hidden_layers",
            serde_json::json!(1e15 as u64),
            "beyond any real model",
        ),
        (
            "hidden_act",
            serde_json::json!("gelu"),
            "unsupported hidden_act 'gelu'",
        ),
        (
            "attention_bias",
            serde_json::json!(true),
            "attention_bias = true",
        ),
        ("mlp_bias", serde_json::json!(true), "mlp_bias = true"),
    ] {
        let mut v = tiny_llama_config().to_hf_value();
        v[key] = value;
        std::fs::write(&path, v.to_string()).unwrap();
        assert_mentions(
            &err_of(ModelConfig::from_hf_json(&path)),
            &["config.json", expect],
        );
    }
    let mut v = tiny_qwen2_config().to_hf_value();
    v["use_sliding_window"] = true.into();
    std::fs::write(&path, v.to_string()).unwrap();
    assert_mentions(
        &err_of(ModelConfig::from_hf_json(&path)),
        &["config.json", "sliding-window"],
    );

    let mut v = tiny_llama_config().to_hf_value();
    v["num_key_value_heads"] = 3.into();
    std::fs::write(&path, v.to_string()).unwrap();
    assert_mentions(
        &err_of(ModelConfig::from_hf_json(&path)),
        &["config.json", "not a multiple"],
    );
}

#[test]
fn weight_shape_disagreeing_with_config() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &tiny_llama_config(), 1, Dtype::F32);
    let mut v = tiny_llama_config().to_hf_value();
    v["intermediate_size"] = 50.into();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let r = genius_engine::transformer::Transformer::load(
        genius_engine::backend::cpu::CpuBackend::new(),
        m.config.clone(),
        m.weights.as_ref(),
    );
    assert_mentions(&err_of(r), &["gate_proj", "shape"]);
}

#[test]
fn missing_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &tiny_llama_config(), 1, Dtype::F32);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let msg = err_of(load_model(Some(dir.path().to_str().unwrap())));
    assert_mentions(&msg, &["tokenizer.json"]);
}

#[test]
fn unknown_model_name() {
    let msg = err_of(load_model(Some("no-such-model-xyz")));
    assert_mentions(&msg, &["no-such-model-xyz", "smollm2-135m-instruct"]);
}

fn run_bin(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_reports_bad_input_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny_checkpoint(&model, &tiny_llama_config(), 1, Dtype::F32);
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"w5 w6\", \"completion\": \"w7\"}\n\n{\"prompt\": \"w5\"}\n{oops\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let (code, err) = run_bin(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_mentions(
        &err,
        &[
            "in.jsonl:3",
            "missing 'completion'",
            "in.jsonl:4",
            "not valid JSON",
        ],
    );

    // A truncated checkpoint through the binary.
    let st = model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 3]).unwrap();
    let (code, err) = run_bin(&["info", "--model", model.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_mentions(&err, &["model.safetensors", "past the end"]);

    // Bad flag.
    let (code, err) = run_bin(&["score", "--device", "tpu", "--input", "x", "--output", "y"]);
    assert_eq!(code, 2, "{err}");
    assert_mentions(&err, &["tpu"]);
}

#[test]
fn device_flags_are_checked() {
    // A GPU-less machine: `--device cuda` says why it cannot run; `auto` runs on the CPU.
    if genius_engine::backend::cuda::probe_devices().is_err() {
        let (code, err) = run_bin(&[
            "bench",
            "forward",
            "--model",
            "random:llama-tiny",
            "--device",
            "cuda",
            "--tokens",
            "8",
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_mentions(&err, &["--device cuda", "driver"]);
        let (code, err) = run_bin(&[
            "bench",
            "forward",
            "--model",
            "random:llama-tiny",
            "--tokens",
            "8",
            "--iters",
            "1",
        ]);
        assert_eq!(code, 0, "{err}");
        assert_mentions(&err, &["on cpu"]);
    }
    // Training goes through the same device choice: on a GPU-less machine an explicit
    // `--device cuda` says why it cannot run, and `auto` trains on the CPU.
    if genius_engine::backend::cuda::probe_devices().is_err() {
        let (code, err) = run_bin(&[
            "bench",
            "train",
            "--model",
            "random:llama-tiny",
            "--device",
            "cuda",
        ]);
        assert_eq!(code, 1, "{err}");
        assert_mentions(&err, &["--device cuda", "driver"]);
        let (code, err) = run_bin(&[
            "bench",
            "train",
            "--model",
            "random:llama-tiny",
            "--tokens",
            "16",
            "--batches",
            "1",
            "--iters",
            "1",
        ]);
        assert_eq!(code, 0, "{err}");
        assert_mentions(&err, &["on cpu"]);
    }
    // `bench gemm` times the CUDA backend only: on the CPU it says so.
    let (code, err) = run_bin(&[
        "bench",
        "gemm",
        "--model",
        "random:llama-tiny",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_mentions(&err, &["bench gemm", "--device cuda"]);
    // The memory fraction must be a share.
    for bad in ["0", "1.5", "-0.2", "nan"] {
        let (code, err) = run_bin(&[
            "bench",
            "forward",
            "--model",
            "random:llama-tiny",
            "--device",
            "cpu",
            "--gpu-memory-fraction",
            bad,
        ]);
        // (clap itself rejects "-0.2", as an unknown flag: exit status 2.)
        assert!(code == 1 || code == 2, "{bad}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        if code == 1 {
            assert_mentions(&err, &["--gpu-memory-fraction", "(0, 1]"]);
        }
    }
}
