//! HF checkpoint directories: sharded weights through `model.safetensors.index.json` load the
//! same tensors as one file, and `info` describes a checkpoint.

mod common;

use common::*;
use genius_engine::model::safetensors::{Dtype, write_safetensors};
use genius_engine::model::{HostTensor, load_model};
use std::process::Command;

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let config = tiny_qwen2_config();
    let weights = write_tiny_checkpoint(&single, &config, 21, Dtype::BF16);

    // Same checkpoint, weights split over three shards by an index.
    let sharded = dir.path().join("sharded");
    write_tiny_checkpoint(&sharded, &config, 21, Dtype::BF16);
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let mut weight_map = serde_json::Map::new();
    for shard in 0..3 {
        let file = format!("model-{:05}-of-00003.safetensors", shard + 1);
        let part: Vec<(&str, &HostTensor)> = weights
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == shard)
            .map(|(_, (n, t))| (n.as_str(), t))
            .collect();
        for (n, _) in &part {
            weight_map.insert(n.to_string(), file.clone().into());
        }
        write_safetensors(&sharded.join(&file), &part, Dtype::BF16).unwrap();
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();

    let a = load_model(Some(single.to_str().unwrap())).unwrap();
    let b = load_model(Some(sharded.to_str().unwrap())).unwrap();
    assert_eq!(a.weights.tensor_names(), b.weights.tensor_names());
    for name in a.weights.tensor_names() {
        assert_eq!(
            a.weights.load_f32(&name).unwrap(),
            b.weights.load_f32(&name).unwrap(),
            "{name}"
        );
    }

    // An index naming a tensor its shard lacks is an error naming the index.
    weight_map.insert(
        "model.extra.weight".into(),
        "model-00001-of-00003.safetensors".into(),
    );
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        load_model(Some(sharded.to_str().unwrap())).err().unwrap()
    );
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("model.extra.weight"),
        "{err}"
    );
}

#[test]
fn info_describes_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_llama_config();
    write_tiny_checkpoint(dir.path(), &config, 2, Dtype::BF16);
    let out = Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .args(["info", "--json", "--model", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["parameters"], config.num_parameters());
    assert_eq!(v["layers"], 2);
    assert_eq!(v["kv_heads"], 2);
    assert_eq!(v["vocab_size"], 64);
    assert_eq!(v["tied_embeddings"], false);
    assert_eq!(v["chat_template"], true);
    assert_eq!(v["bos_token"], serde_json::json!(["<s>", 0]));
    assert_eq!(v["eos_token"], serde_json::json!(["</s>", 1]));
    assert!(v["rope_scaling"].as_str().unwrap().starts_with("llama3"));
    // embedding, LM head, final norm, and 9 tensors per layer
    assert_eq!(v["dtypes"]["BF16"], 3 + 2 * 9);
    assert!(v["devices"][0].as_str().unwrap().starts_with("cpu"));
    // the parameter count is what the checkpoint holds
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let held: usize = m
        .weights
        .tensor_names()
        .iter()
        .map(|n| m.weights.shape(n).unwrap().iter().product::<usize>())
        .sum();
    assert_eq!(held, config.num_parameters());
}
