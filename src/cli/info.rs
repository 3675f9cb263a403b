//! `genius-engine info`: what a model is and where it can run.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{probe_devices, readiness};
use crate::model::{RopeScaling, load_model};
use anyhow::Result;
use serde_json::json;

/// `135M`, `1.54B`.
pub fn human_count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

pub fn run(model: Option<&str>, as_json: bool) -> Result<()> {
    let m = load_model(model)?;
    let c = &m.config;
    let t = &m.tokenizer;
    let cuda = probe_devices();
    let cpu = CpuBackend::new();
    let rope_scaling = match &c.rope_scaling {
        None => "none".to_string(),
        Some(RopeScaling::Llama3 { factor, .. }) => format!("llama3 (factor {factor})"),
        Some(RopeScaling::FreqFactors(f)) => format!("per-frequency factors ({} values)", f.len()),
    };
    let devices: Vec<String> = std::iter::once(format!("cpu: {} threads", cpu.threads()))
        .chain(match &cuda {
            Ok(devs) if devs.is_empty() => vec!["cuda: driver present, no devices".to_string()],
            Ok(devs) => devs
                .iter()
                .map(|d| {
                    format!(
                        "cuda:{}: {} ({:.0} GiB; {})",
                        d.ordinal,
                        d.name,
                        d.total_memory as f64 / (1u64 << 30) as f64,
                        readiness()
                    )
                })
                .collect(),
            Err(why) => vec![format!("cuda: unavailable ({why})")],
        })
        .collect();
    let dtypes = m.weights.dtype_counts();
    if as_json {
        let v = json!({
            "name": m.name,
            "path": m.path,
            "format": format!("{:?}", m.format),
            "architecture": c.arch.name(),
            "parameters": c.num_parameters(),
            "layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "heads": c.num_heads,
            "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "tokenizer_vocab_size": t.vocab_size(),
            "context_length": c.max_position_embeddings,
            "rope_theta": c.rope_theta,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": c.rms_norm_eps,
            "tied_embeddings": c.tie_word_embeddings,
            "attention_bias": c.attention_bias,
            "dtypes": dtypes,
            "bos_token": t.bos_token,
            "eos_token": t.eos_token,
            "eos_ids": t.eos_ids,
            "chat_template": t.chat_template.is_some(),
            "devices": devices,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let tok = |x: &Option<(String, u32)>| match x {
        Some((s, id)) => format!("{s:?} ({id})"),
        None => "none".into(),
    };
    println!(
        "model          {} ({:?}, {})",
        m.name,
        m.format,
        m.path.display()
    );
    println!("architecture   {}", c.arch.name());
    println!(
        "parameters     {} ({})",
        human_count(c.num_parameters()),
        c.num_parameters()
    );
    println!(
        "shape          {} layers, hidden {}, ffn {}, {} heads / {} kv heads of {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!(
        "vocabulary     {} (tokenizer: {})",
        c.vocab_size,
        t.vocab_size()
    );
    println!("context        {}", c.max_position_embeddings);
    println!(
        "rope           theta {}, scaling {rope_scaling}",
        c.rope_theta
    );
    println!(
        "lm head        {}",
        if c.tie_word_embeddings {
            "tied to the embedding"
        } else {
            "separate"
        }
    );
    println!(
        "dtypes         {}",
        dtypes
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("bos            {}", tok(&t.bos_token));
    println!(
        "eos            {} (stop ids {:?})",
        tok(&t.eos_token),
        t.eos_ids
    );
    println!(
        "chat template  {}",
        if t.chat_template.is_some() {
            "present"
        } else {
            "absent"
        }
    );
    for (i, d) in devices.iter().enumerate() {
        println!(
            "{}{d}",
            if i == 0 {
                "devices        "
            } else {
                "               "
            }
        );
    }
    Ok(())
}
