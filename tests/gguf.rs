//! GGUF loading: dequantisation of every supported type against hand-computed values, llama.cpp's
//! q/k row permutation, config and tokenizer from metadata, and corrupt input (errors, never
//! panics), and the default model's real file.

use genius_engine::model::gguf::{
    GgmlType, GgufFile, GgufValue, GgufWriter, config_from_gguf, load_gguf_file, load_gguf_model,
    tokenizer_from_gguf,
};
use genius_engine::model::{Architecture, ModelFormat, RopeScaling, TensorSource};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn write(dir: &Path, name: &str, w: &GgufWriter) -> PathBuf {
    let path = dir.join(name);
    w.write(&path).expect("write gguf");
    path
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Asserts that `result` is an error whose message names `path` and contains every word.
fn assert_err_mentions<T>(result: anyhow::Result<T>, path: &Path, words: &[&str]) {
    let err = match result {
        Ok(_) => panic!("expected an error mentioning {words:?}, got Ok"),
        Err(e) => format!("{e:#}"),
    };
    let p = path.display().to_string();
    assert!(err.contains(&p), "error does not name the file {p}: {err}");
    for w in words {
        assert!(err.contains(w), "error does not mention {w:?}: {err}");
    }
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the others to U+0100...
fn byte_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// A tiny byte-level BPE vocabulary: three control tokens, all 256 byte tokens, the results of
/// a few merges, and one user-defined token.
struct TinyVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
}

fn tiny_vocab() -> TinyVocab {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![TYPE_CONTROL; 3];
    for c in byte_to_unicode() {
        tokens.push(c.to_string());
        types.push(TYPE_NORMAL);
    }
    let merges: Vec<String> = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
    ]
    .map(String::from)
    .to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(TYPE_NORMAL);
    }
    tokens.push("<think>".into());
    types.push(TYPE_USER_DEFINED);
    TinyVocab {
        tokens,
        types,
        merges,
    }
}

fn add_tokenizer_metadata(w: &mut GgufWriter, vocab: &TinyVocab, pre: &str, add_bos: bool) {
    w.add_metadata("tokenizer.ggml.model", "gpt2")
        .add_metadata("tokenizer.ggml.pre", pre)
        .add_metadata("tokenizer.ggml.tokens", vocab.tokens.clone())
        .add_metadata("tokenizer.ggml.token_type", vocab.types.clone())
        .add_metadata("tokenizer.ggml.merges", vocab.merges.clone())
        .add_metadata("tokenizer.ggml.bos_token_id", 1u32)
        .add_metadata("tokenizer.ggml.eos_token_id", 2u32)
        .add_metadata("tokenizer.ggml.eot_token_id", 0u32)
        .add_metadata("tokenizer.ggml.add_bos_token", add_bos)
        .add_metadata(
            "tokenizer.chat_template",
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        );
}

/// Shape of the tiny models.
#[derive(Clone)]
struct TinySpec {
    arch: &'static str,
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    tied: bool,
    q_bias: bool,
}

impl TinySpec {
    fn llama() -> Self {
        TinySpec {
            arch: "llama",
            layers: 2,
            hidden: 16,
            ffn: 24,
            heads: 4,
            kv_heads: 2,
            tied: true,
            q_bias: false,
        }
    }
    fn qwen2() -> Self {
        TinySpec {
            arch: "qwen2",
            tied: false,
            q_bias: true,
            ..Self::llama()
        }
    }
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Distinct, deterministic values for tensor number `seed`.
fn distinct_values(seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| seed as f32 * 1000.0 + i as f32 * 0.25 - 3.0)
        .collect()
}

/// llama.cpp's converter permutation, written out index by index as numpy does
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for two in 0..2 {
            for i in 0..half {
                // Element [h][two][i][c] of the reshaped array is HF row h*2*half + two*half + i;
                // after swapaxes(1, 2) it sits at [h][i][two][c], i.e. row h*2*half + i*2 + two.
                let src = h * 2 * half + two * half + i;
                let dst = h * 2 * half + i * 2 + two;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A complete tiny model in F32 (q/k permuted as llama.cpp does for `llama`); returns the writer
/// (to add to or break) and the HF-layout tensors it holds.
fn tiny_model(spec: &TinySpec, pre: &str) -> (GgufWriter, BTreeMap<String, Vec<f32>>) {
    let vocab = tiny_vocab();
    let (h, f, d) = (spec.hidden, spec.ffn, spec.head_dim());
    let (q, kv) = (spec.heads * d, spec.kv_heads * d);
    let a = spec.arch;
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", a)
        .add_metadata("general.name", "tiny")
        .add_metadata(format!("{a}.block_count"), spec.layers as u32)
        .add_metadata(format!("{a}.context_length"), 256u32)
        .add_metadata(format!("{a}.embedding_length"), h as u32)
        .add_metadata(format!("{a}.feed_forward_length"), f as u32)
        .add_metadata(format!("{a}.attention.head_count"), spec.heads as u32)
        .add_metadata(format!("{a}.attention.head_count_kv"), spec.kv_heads as u32)
        .add_metadata(format!("{a}.rope.freq_base"), 100000.0f32)
        .add_metadata(format!("{a}.attention.layer_norm_rms_epsilon"), 1e-5f32)
        .add_metadata(format!("{a}.rope.dimension_count"), d as u32);
    add_tokenizer_metadata(&mut w, &vocab, pre, false);

    let v = vocab.tokens.len();
    let mut tensors: Vec<(String, String, Vec<usize>)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![v, h],
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![h],
        ),
    ];
    if !spec.tied {
        tensors.push(("output.weight".into(), "lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..spec.layers {
        let mut layer: Vec<(&str, &str, Vec<usize>)> = vec![
            ("attn_norm.weight", "input_layernorm.weight", vec![h]),
            ("attn_q.weight", "self_attn.q_proj.weight", vec![q, h]),
            ("attn_k.weight", "self_attn.k_proj.weight", vec![kv, h]),
            ("attn_v.weight", "self_attn.v_proj.weight", vec![kv, h]),
            ("attn_output.weight", "self_attn.o_proj.weight", vec![h, q]),
            (
                "ffn_norm.weight",
                "post_attention_layernorm.weight",
                vec![h],
            ),
            ("ffn_gate.weight", "mlp.gate_proj.weight", vec![f, h]),
            ("ffn_up.weight", "mlp.up_proj.weight", vec![f, h]),
            ("ffn_down.weight", "mlp.down_proj.weight", vec![h, f]),
        ];
        if spec.q_bias {
            layer.extend([
                ("attn_q.bias", "self_attn.q_proj.bias", vec![q]),
                ("attn_k.bias", "self_attn.k_proj.bias", vec![kv]),
                ("attn_v.bias", "self_attn.v_proj.bias", vec![kv]),
            ]);
        }
        for (g, hf, shape) in layer {
            tensors.push((
                format!("blk.{l}.{g}"),
                format!("model.layers.{l}.{hf}"),
                shape,
            ));
        }
    }
    let mut hf = BTreeMap::new();
    for (seed, (gguf_name, hf_name, shape)) in tensors.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let values = distinct_values(seed, n);
        let stored = match gguf_name.rsplit('.').nth(1) {
            Some("attn_q") if a == "llama" => {
                llama_cpp_permute(&values, shape[0], n / shape[0], spec.heads)
            }
            Some("attn_k") if a == "llama" => {
                llama_cpp_permute(&values, shape[0], n / shape[0], spec.kv_heads)
            }
            _ => values.clone(),
        };
        w.add_tensor(&gguf_name, &shape, &stored, GgmlType::F32)
            .expect("add tensor");
        hf.insert(hf_name, values);
    }
    (w, hf)
}

// ---------------------------------------------------------------------------------------------
// Dequantisation of every type, against values computed by hand
// ---------------------------------------------------------------------------------------------

/// Writes one tensor of raw bytes and reads it back as f32 with its HF shape.
fn roundtrip_raw(ty: GgmlType, shape: &[usize], bytes: Vec<u8>) -> (Vec<usize>, Vec<f32>) {
    let dir = temp_dir();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama");
    w.add_raw_tensor("t", shape, ty.id(), bytes);
    let path = write(dir.path(), "t.gguf", &w);
    let file = GgufFile::open(&path).expect("open");
    let info = file.tensor("t").expect("tensor t");
    assert_eq!(info.ggml_type, ty);
    (info.hf_shape(), file.read_f32("t").expect("read"))
}

#[test]
fn f32_tensor_with_odd_rows() {
    let values: Vec<f32> = (0..15).map(|i| i as f32 * -1.5 + 0.125).collect();
    let (shape, got) = roundtrip_raw(GgmlType::F32, &[3, 5], f32_bytes(&values));
    assert_eq!(shape, vec![3, 5]);
    assert_eq!(got, values);
}

#[test]
fn f16_bits_by_hand() {
    // 1.0, -2.0, 0.5, 65504 (max), 2^-24 (smallest subnormal), -0.0
    let bits: [u16; 6] = [0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x8000];
    let expected = [1.0, -2.0, 0.5, 65504.0, 2f32.powi(-24), -0.0];
    let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let (shape, got) = roundtrip_raw(GgmlType::F16, &[2, 3], bytes);
    assert_eq!(shape, vec![2, 3]);
    assert_eq!(got, expected);
    assert!(got[5].is_sign_negative());
}

#[test]
fn bf16_bits_by_hand() {
    // 1.0, -3.0, 3.140625, 0, 1.5 * 2^100, -1/128
    let bits: [u16; 6] = [0x3F80, 0xC040, 0x4049, 0x0000, 0x71C0, 0xBC00];
    let expected = [1.0, -3.0, 3.140625, 0.0, 1.5 * 2f32.powi(100), -1.0 / 128.0];
    let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let (shape, got) = roundtrip_raw(GgmlType::BF16, &[6], bytes);
    assert_eq!(shape, vec![6]);
    assert_eq!(got, expected);
}

/// f16 bit patterns of the block scales used below, with their values.
const SCALES: [(u16, f32); 6] = [
    (0x3800, 0.5),
    (0x4000, 2.0),
    (0xB400, -0.25),
    (0x3C00, 1.0),
    (0x2E66, (1024.0 + 614.0) / 16384.0), // ~0.1: 2^-4 * (1 + 614/1024)
    (0x4900, 10.0),
];

/// 3 rows of 64 elements: each row spans two blocks of 32, six blocks in all.
const Q_SHAPE: [usize; 2] = [3, 64];

#[test]
fn q8_0_blocks_by_hand() {
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for (b, &(d_bits, d)) in SCALES.iter().enumerate() {
        bytes.extend(d_bits.to_le_bytes());
        for j in 0..32i32 {
            // Covers -128 and 127 in the first block.
            let q: i8 = match (b, j) {
                (0, 0) => -128,
                (0, 1) => 127,
                _ => (j * 7 - 100 + b as i32 * 13).clamp(-128, 127) as i8,
            };
            bytes.push(q as u8);
            expected.push(q as f32 * d);
        }
    }
    let (shape, got) = roundtrip_raw(GgmlType::Q8_0, &Q_SHAPE, bytes);
    assert_eq!(shape, Q_SHAPE.to_vec());
    assert_eq!(got, expected);
    assert_eq!(got[0], -64.0); // -128 * 0.5
    assert_eq!(got[1], 63.5); // 127 * 0.5
}

/// Nibbles of block `b`: low nibble of byte j is element j, high nibble element j + 16.
fn nibbles(b: usize) -> Vec<(u8, u8)> {
    (0..16)
        .map(|j| (((j + b) % 16) as u8, ((15 - j + 3 * b) % 16) as u8))
        .collect()
}

#[test]
fn q4_0_blocks_by_hand() {
    let mut bytes = Vec::new();
    let mut expected = vec![0.0f32; 32 * SCALES.len()];
    for (b, &(d_bits, d)) in SCALES.iter().enumerate() {
        bytes.extend(d_bits.to_le_bytes());
        for (j, (lo, hi)) in nibbles(b).into_iter().enumerate() {
            bytes.push(lo | (hi << 4));
            expected[b * 32 + j] = (lo as f32 - 8.0) * d;
            expected[b * 32 + j + 16] = (hi as f32 - 8.0) * d;
        }
    }
    let (shape, got) = roundtrip_raw(GgmlType::Q4_0, &Q_SHAPE, bytes);
    assert_eq!(shape, Q_SHAPE.to_vec());
    assert_eq!(got, expected);
    // Block 0 (d = 0.5): byte 0 holds low nibble 0 -> (0 - 8) * 0.5 = -4, high nibble 15 -> 3.5.
    assert_eq!((got[0], got[16]), (-4.0, 3.5));
}

#[test]
fn q4_1_blocks_by_hand() {
    // Block minimums: f16 bits and values.
    let mins: [(u16, f32); 6] = [
        (0xBC00, -1.0),
        (0x0000, 0.0),
        (0x4200, 3.0),
        (0xC500, -5.0),
        (0x3400, 0.25),
        (0xB800, -0.5),
    ];
    let mut bytes = Vec::new();
    let mut expected = vec![0.0f32; 32 * SCALES.len()];
    for (b, (&(d_bits, d), &(m_bits, m))) in SCALES.iter().zip(&mins).enumerate() {
        bytes.extend(d_bits.to_le_bytes());
        bytes.extend(m_bits.to_le_bytes());
        for (j, (lo, hi)) in nibbles(b).into_iter().enumerate() {
            bytes.push(lo | (hi << 4));
            expected[b * 32 + j] = lo as f32 * d + m;
            expected[b * 32 + j + 16] = hi as f32 * d + m;
        }
    }
    let (shape, got) = roundtrip_raw(GgmlType::Q4_1, &Q_SHAPE, bytes);
    assert_eq!(shape, Q_SHAPE.to_vec());
    assert_eq!(got, expected);
    // Block 0: d = 0.5, m = -1; byte 3 has low nibble 3 -> 3 * 0.5 - 1 = 0.5.
    assert_eq!(got[3], 0.5);
}

#[test]
fn quantised_rows_must_be_whole_blocks() {
    let dir = temp_dir();
    let mut w = GgufWriter::new();
    w.add_raw_tensor("t", &[2, 40], GgmlType::Q8_0.id(), vec![0; 2 * 34 + 34]);
    let path = write(dir.path(), "rows.gguf", &w);
    assert_err_mentions(GgufFile::open(&path), &path, &["t", "block size"]);
}

#[test]
fn writer_quantisers_load_back_close_to_the_input() {
    let dir = temp_dir();
    let data: Vec<f32> = (0..3 * 64)
        .map(|i| ((i * 29 % 97) as f32 - 48.0) / 16.0)
        .collect();
    let mut w = GgufWriter::new();
    for ty in GgmlType::SUPPORTED {
        w.add_tensor(ty.name(), &Q_SHAPE, &data, ty).unwrap();
    }
    let path = write(dir.path(), "q.gguf", &w);
    let file = GgufFile::open(&path).unwrap();
    for (ty, tol) in [
        (GgmlType::F32, 0.0),
        (GgmlType::F16, 1e-3),
        (GgmlType::BF16, 1e-2),
        (GgmlType::Q8_0, 0.02),
        (GgmlType::Q4_0, 0.4),
        (GgmlType::Q4_1, 0.2),
    ] {
        let got = file.read_f32(ty.name()).unwrap();
        let err = data
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= tol, "{ty}: max abs error {err} > {tol}");
    }
}

#[test]
fn metadata_of_every_type_round_trips() {
    let dir = temp_dir();
    let values: Vec<(&str, GgufValue)> = vec![
        ("u8", GgufValue::U8(200)),
        ("i8", GgufValue::I8(-100)),
        ("u16", GgufValue::U16(60000)),
        ("i16", GgufValue::I16(-30000)),
        ("u32", GgufValue::U32(4_000_000_000)),
        ("i32", GgufValue::I32(-2_000_000_000)),
        ("f32", GgufValue::F32(1.5)),
        ("bool", GgufValue::Bool(true)),
        ("string", GgufValue::String("héllo".into())),
        ("u64", GgufValue::U64(u64::MAX)),
        ("i64", GgufValue::I64(i64::MIN)),
        ("f64", GgufValue::F64(-2.25)),
        ("array", vec![1i32, 2, 3].into()),
        (
            "nested",
            GgufValue::Array(vec![vec!["a", "b"].into(), vec!["c"].into()]),
        ),
        ("empty", GgufValue::Array(vec![])),
        ("general.alignment", GgufValue::U32(64)),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &values {
        w.add_metadata(*k, v.clone());
    }
    w.add_tensor("a", &[3], &[1.0, 2.0, 3.0], GgmlType::F32)
        .unwrap();
    w.add_tensor("b", &[2], &[4.0, 5.0], GgmlType::F32).unwrap();
    let path = write(dir.path(), "meta.gguf", &w);
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 64);
    for (k, v) in &values {
        assert_eq!(file.get(k), Some(v), "key {k}");
    }
    assert_eq!(file.tensor("b").unwrap().offset, 64);
    assert_eq!(file.read_f32("b").unwrap(), vec![4.0, 5.0]);
    assert_eq!(file.get_usize("u32").unwrap(), Some(4_000_000_000));
    assert!(file.get_usize("i64").is_err());
}

// ---------------------------------------------------------------------------------------------
// Weights in HF names and layout, q/k un-permutation
// ---------------------------------------------------------------------------------------------

#[test]
fn llama_q_k_rows_are_unpermuted_to_hf_layout() {
    let dir = temp_dir();
    // GQA: 4 heads, 2 KV heads, head_dim 4; with q/k/v biases, which the converter permutes too.
    let spec = TinySpec {
        q_bias: true,
        ..TinySpec::llama()
    };
    let (w, hf) = tiny_model(&spec, "smollm");
    let path = write(dir.path(), "llama.gguf", &w);
    let model = load_gguf_model(&path).unwrap();
    assert!(model.config.attention_bias);
    for l in 0..spec.layers {
        for proj in ["q_proj", "k_proj", "v_proj"] {
            for kind in ["weight", "bias"] {
                let name = format!("model.layers.{l}.self_attn.{proj}.{kind}");
                let t = model.weights.load_f32(&name).unwrap();
                assert_eq!(&t.data, &hf[&name], "{name}");
            }
        }
    }
    // The permutation is not the identity for these shapes, so the check above means something.
    let q = &hf["model.layers.0.self_attn.q_proj.weight"];
    assert_ne!(&llama_cpp_permute(q, 16, 16, 4), q);
    let k = &hf["model.layers.0.self_attn.k_proj.weight"];
    assert_ne!(&llama_cpp_permute(k, 8, 16, 2), k);
    // Every other tensor comes back exactly, in HF shape.
    for name in model.weights.tensor_names() {
        let t = model.weights.load_f32(&name).unwrap();
        assert_eq!(&t.data, &hf[&name], "{name}");
        assert_eq!(Some(t.shape.clone()), model.weights.shape(&name));
    }
    assert_eq!(model.weights.tensor_names().len(), hf.len());
    assert_eq!(
        model
            .weights
            .shape("model.layers.1.self_attn.k_proj.weight"),
        Some(vec![8, 16])
    );
}

#[test]
fn qwen2_q_k_rows_are_not_unpermuted() {
    let dir = temp_dir();
    let spec = TinySpec::qwen2();
    let (mut w, hf) = tiny_model(&spec, "qwen2");
    w.add_tensor("extra_ignored.weight", &[2], &[1.0, 2.0], GgmlType::F32)
        .unwrap();
    let path = write(dir.path(), "qwen.gguf", &w);
    let model = load_gguf_model(&path).unwrap();
    for name in hf.keys() {
        assert_eq!(
            &model.weights.load_f32(name).unwrap().data,
            &hf[name],
            "{name}"
        );
    }
    assert!(
        !model
            .weights
            .tensor_names()
            .iter()
            .any(|n| n.contains("extra"))
    );

    // A qwen2 file whose q_proj holds llama.cpp-permuted rows comes back as stored.
    let q = &hf["model.layers.0.self_attn.q_proj.weight"];
    let permuted = llama_cpp_permute(q, 16, 16, 4);
    let w = rewrite_tensors(&path, |name, data| {
        if name == "blk.0.attn_q.weight" {
            Some(permuted.clone())
        } else {
            Some(data)
        }
    });
    let path = write(dir.path(), "qwen_permuted.gguf", &w);
    let model = load_gguf_model(&path).unwrap();
    let got = model
        .weights
        .load_f32("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(&got.data, &permuted);
}

/// A writer with `path`'s metadata and tensors (as F32), each tensor's data passed through
/// `edit` (`None` drops it).
fn rewrite_tensors(
    path: &Path,
    mut edit: impl FnMut(&str, Vec<f32>) -> Option<Vec<f32>>,
) -> GgufWriter {
    let file = GgufFile::open(path).unwrap();
    let mut out = GgufWriter::new();
    for (k, v) in file.metadata() {
        out.add_metadata(k.clone(), v.clone());
    }
    for t in file.tensors() {
        if let Some(data) = edit(&t.name, file.read_f32(&t.name).unwrap()) {
            out.add_tensor(&t.name, &t.hf_shape(), &data, GgmlType::F32)
                .unwrap();
        }
    }
    out
}

#[test]
fn dtype_counts_use_gguf_type_names() {
    let dir = temp_dir();
    let mut w = GgufWriter::new();
    w.add_tensor("token_embd.weight", &[2, 32], &[0.5; 64], GgmlType::Q8_0)
        .unwrap()
        .add_tensor("blk.0.ffn_up.weight", &[2, 32], &[0.5; 64], GgmlType::Q4_1)
        .unwrap()
        .add_tensor(
            "blk.0.ffn_down.weight",
            &[2, 32],
            &[0.5; 64],
            GgmlType::Q4_1,
        )
        .unwrap()
        .add_tensor("output_norm.weight", &[2], &[0.5; 2], GgmlType::F32)
        .unwrap()
        .add_tensor("rope_freqs.weight", &[2], &[0.5; 2], GgmlType::F32)
        .unwrap();
    let path = write(dir.path(), "types.gguf", &w);
    let file = std::sync::Arc::new(GgufFile::open(&path).unwrap());
    let cfg = {
        let (w, _) = tiny_model(&TinySpec::llama(), "smollm");
        let p = write(dir.path(), "cfg.gguf", &w);
        load_gguf_model(&p).unwrap().config
    };
    let weights = genius_engine::model::gguf::GgufWeights::new(file, &cfg).unwrap();
    let counts = weights.dtype_counts();
    let expected: BTreeMap<String, usize> = [("F32", 1), ("Q4_1", 2), ("Q8_0", 1)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    assert_eq!(counts, expected);
}

// ---------------------------------------------------------------------------------------------
// Config from metadata
// ---------------------------------------------------------------------------------------------

#[test]
fn llama_config_from_metadata() {
    let dir = temp_dir();
    let (w, _) = tiny_model(&TinySpec::llama(), "smollm");
    let path = write(dir.path(), "tiny-llama.gguf", &w);
    let model = load_gguf_model(&path).unwrap();
    let c = &model.config;
    assert_eq!(c.arch, Architecture::Llama);
    assert_eq!(
        (c.num_layers, c.hidden_size, c.intermediate_size),
        (2, 16, 24)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 4));
    assert_eq!(c.vocab_size, tiny_vocab().tokens.len());
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 256);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(model.format, ModelFormat::Gguf);
    assert_eq!(model.name, "tiny-llama");
    assert!(model.weights.shape("lm_head.weight").is_none());
}

#[test]
fn qwen2_config_from_metadata_has_biases_and_untied_head() {
    let dir = temp_dir();
    let (w, _) = tiny_model(&TinySpec::qwen2(), "qwen2");
    let path = write(dir.path(), "tiny-qwen.gguf", &w);
    let model = load_gguf_model(&path).unwrap();
    assert_eq!(model.config.arch, Architecture::Qwen2);
    assert!(model.config.attention_bias);
    assert!(!model.config.tie_word_embeddings);
    let v = tiny_vocab().tokens.len();
    assert_eq!(model.weights.shape("lm_head.weight"), Some(vec![v, 16]));
}

#[test]
fn config_defaults_for_optional_keys() {
    let dir = temp_dir();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama")
        .add_metadata("llama.block_count", 1u32)
        .add_metadata("llama.context_length", 64u64)
        .add_metadata("llama.embedding_length", 8u32)
        .add_metadata("llama.feed_forward_length", 16i32)
        .add_metadata("llama.attention.head_count", 2u32)
        .add_metadata("llama.attention.layer_norm_rms_epsilon", 1e-6f32)
        .add_metadata("llama.vocab_size", 10u32);
    let path = write(dir.path(), "defaults.gguf", &w);
    let c = config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!((c.num_kv_heads, c.head_dim), (2, 4));
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.vocab_size, 10);
}

#[test]
fn rope_freqs_tensor_becomes_freq_factors() {
    let dir = temp_dir();
    let (mut w, _) = tiny_model(&TinySpec::llama(), "smollm");
    // head_dim 4 -> 2 factors.
    w.add_tensor("rope_freqs.weight", &[2], &[1.0, 8.0], GgmlType::F32)
        .unwrap();
    let path = write(dir.path(), "rope.gguf", &w);
    let model = load_gguf_model(&path).unwrap();
    assert_eq!(
        model.config.rope_scaling,
        Some(RopeScaling::FreqFactors(vec![1.0, 8.0]))
    );
    assert!(
        !model
            .weights
            .tensor_names()
            .iter()
            .any(|n| n.contains("rope"))
    );

    let (mut w, _) = tiny_model(&TinySpec::llama(), "smollm");
    w.add_tensor("rope_freqs.weight", &[3], &[1.0, 2.0, 3.0], GgmlType::F32)
        .unwrap();
    let path = write(dir.path(), "rope_bad.gguf", &w);
    assert_err_mentions(load_gguf_model(&path), &path, &["rope_freqs.weight", "2"]);
}

#[test]
fn unsupported_architecture_and_missing_keys_are_named() {
    let dir = temp_dir();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "gemma2");
    let path = write(dir.path(), "gemma.gguf", &w);
    assert_err_mentions(load_gguf_model(&path), &path, &["architecture", "gemma2"]);

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama")
        .add_metadata("llama.embedding_length", 8u32)
        .add_metadata("llama.attention.head_count", 2u32)
        .add_metadata("llama.vocab_size", 10u32);
    let path = write(dir.path(), "missing.gguf", &w);
    assert_err_mentions(
        load_gguf_model(&path),
        &path,
        &["missing", "llama.feed_forward_length"],
    );

    let w = GgufWriter::new();
    let path = write(dir.path(), "noarch.gguf", &w);
    assert_err_mentions(
        load_gguf_model(&path),
        &path,
        &["missing", "general.architecture"],
    );
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let dir = temp_dir();
    let (w, _) = tiny_model(&TinySpec::llama(), "smollm");
    let base = write(dir.path(), "base.gguf", &w);
    let w = rewrite_tensors(&base, |name, data| {
        (name != "blk.1.ffn_up.weight").then_some(data)
    });
    let path = write(dir.path(), "missing_tensor.gguf", &w);
    assert_err_mentions(
        load_gguf_model(&path),
        &path,
        &["missing tensor", "blk.1.ffn_up.weight"],
    );
}

// ---------------------------------------------------------------------------------------------
// Tokenizer from metadata
// ---------------------------------------------------------------------------------------------

fn tokenizer_file(dir: &Path, name: &str, pre: &str, add_bos: bool) -> PathBuf {
    let mut w = GgufWriter::new();
    add_tokenizer_metadata(&mut w, &tiny_vocab(), pre, add_bos);
    write(dir, name, &w)
}

fn id(tokens: &[String], token: &str) -> u32 {
    tokens.iter().position(|t| t == token).unwrap() as u32
}

#[test]
fn tokenizer_round_trips_and_merges() {
    let dir = temp_dir();
    let path = tokenizer_file(dir.path(), "tok.gguf", "smollm", false);
    let tok = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let vocab = tiny_vocab().tokens;
    assert_eq!(tok.vocab_size(), vocab.len());
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        vec![id(&vocab, "hello"), id(&vocab, "Ġworld")]
    );
    for text in [
        "hello world",
        "héllo wörld, 123 🙂\n\ttabs  and  spaces",
        "",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "ids {ids:?}");
    }
    assert_eq!(
        tok.chat_template
            .as_deref()
            .map(|t| t.contains("<|im_start|>")),
        Some(true)
    );
    assert_eq!(tok.bos_token, Some(("<|im_start|>".to_string(), 1)));
    assert_eq!(tok.eos_token, Some(("<|im_end|>".to_string(), 2)));
    assert_eq!(tok.eos_ids, vec![2, 0]);
}

#[test]
fn control_tokens_are_single_special_ids_and_user_defined_are_added() {
    let dir = temp_dir();
    let path = tokenizer_file(dir.path(), "tok.gguf", "smollm", false);
    let tok = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let vocab = tiny_vocab().tokens;
    let ids = tok
        .encode("<|im_start|>user\nhello<|im_end|>", false)
        .unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(ids[ids.len() - 2], id(&vocab, "hello"));
    let ids = tok.encode("a<think>b", false).unwrap();
    assert_eq!(
        ids,
        vec![id(&vocab, "a"), id(&vocab, "<think>"), id(&vocab, "b")]
    );
    // Control tokens are special: skipped when decoding with skip_special_tokens.
    let inner = tok.inner();
    assert_eq!(
        inner.decode(&[1, id(&vocab, "hello"), 2], true).unwrap(),
        "hello"
    );
}

#[test]
fn smollm_splits_digits_individually_but_gpt2_merges_them() {
    let dir = temp_dir();
    let vocab = tiny_vocab().tokens;
    let digits = |c: &str| id(&vocab, c);
    let smollm = tokenizer_from_gguf(
        &GgufFile::open(&tokenizer_file(dir.path(), "s.gguf", "smollm", false)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        smollm.encode("123", false).unwrap(),
        vec![digits("1"), digits("2"), digits("3")]
    );
    let gpt2 = tokenizer_from_gguf(
        &GgufFile::open(&tokenizer_file(dir.path(), "g.gguf", "gpt2", false)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        gpt2.encode("123", false).unwrap(),
        vec![digits("12"), digits("3")]
    );
    // LLaMA-3 groups up to three digits before BPE; Qwen2 splits them like SmolLM.
    for (pre, expected) in [
        ("llama-bpe", vec![digits("12"), digits("3")]),
        ("qwen2", vec![digits("1"), digits("2"), digits("3")]),
    ] {
        let tok = tokenizer_from_gguf(
            &GgufFile::open(&tokenizer_file(
                dir.path(),
                &format!("{pre}.gguf"),
                pre,
                false,
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(tok.encode("123", false).unwrap(), expected, "{pre}");
        let text = "hello world 12345!\n";
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text);
    }
}

#[test]
fn bos_is_added_only_when_add_bos_token() {
    let dir = temp_dir();
    let vocab = tiny_vocab().tokens;
    let hello = id(&vocab, "hello");
    let with_bos = tokenizer_from_gguf(
        &GgufFile::open(&tokenizer_file(dir.path(), "b.gguf", "smollm", true)).unwrap(),
    )
    .unwrap();
    assert_eq!(with_bos.encode("hello", true).unwrap(), vec![1, hello]);
    assert_eq!(with_bos.encode("hello", false).unwrap(), vec![hello]);
    let without = tokenizer_from_gguf(
        &GgufFile::open(&tokenizer_file(dir.path(), "n.gguf", "smollm", false)).unwrap(),
    )
    .unwrap();
    assert_eq!(without.encode("hello", true).unwrap(), vec![hello]);
}

#[test]
fn unsupported_tokenizers_are_named() {
    let dir = temp_dir();
    let path = tokenizer_file(dir.path(), "pre.gguf", "falcon", false);
    assert_err_mentions(
        tokenizer_from_gguf(&GgufFile::open(&path).unwrap()),
        &path,
        &["falcon", "not supported", "smollm", "llama-bpe", "qwen2"],
    );

    let mut w = GgufWriter::new();
    w.add_metadata("tokenizer.ggml.model", "llama")
        .add_metadata("tokenizer.ggml.tokens", vec!["<unk>", "a"]);
    let path = write(dir.path(), "spm.gguf", &w);
    assert_err_mentions(
        tokenizer_from_gguf(&GgufFile::open(&path).unwrap()),
        &path,
        &["llama", "not supported", "gpt2"],
    );
}

// ---------------------------------------------------------------------------------------------
// Corrupt input
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_magic_and_versions_are_rejected() {
    let dir = temp_dir();
    let (w, _) = tiny_model(&TinySpec::llama(), "smollm");
    let good = w.to_bytes().unwrap();

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let path = dir.path().join("magic.gguf");
    std::fs::write(&path, &bad).unwrap();
    assert_err_mentions(load_gguf_model(&path), &path, &["magic"]);

    for version in [1u32, 4] {
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&version.to_le_bytes());
        let path = dir.path().join(format!("v{version}.gguf"));
        std::fs::write(&path, &bad).unwrap();
        assert_err_mentions(
            load_gguf_model(&path),
            &path,
            &["version", &version.to_string()],
        );
    }

    let mut v2 = good.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let path = dir.path().join("v2.gguf");
    std::fs::write(&path, &v2).unwrap();
    assert_eq!(GgufFile::open(&path).unwrap().version(), 2);

    let path = dir.path().join("empty.gguf");
    std::fs::write(&path, b"").unwrap();
    assert_err_mentions(load_gguf_model(&path), &path, &["truncated"]);

    let path = dir.path().join("does-not-exist.gguf");
    assert_err_mentions(load_gguf_model(&path), &path, &["cannot open"]);
}

#[test]
fn unsupported_tensor_types_name_the_tensor_and_type() {
    let dir = temp_dir();
    for (type_id, type_name) in [(12u32, "Q4_K (12)"), (99, "unknown (99)")] {
        let mut w = GgufWriter::new();
        w.add_raw_tensor("blk.0.attn_q.weight", &[4, 256], type_id, vec![0; 576]);
        let path = write(dir.path(), &format!("type{type_id}.gguf"), &w);
        assert_err_mentions(
            load_gguf_model(&path),
            &path,
            &[
                "tensor blk.0.attn_q.weight has type",
                type_name,
                "not supported; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
            ],
        );
    }
}

#[test]
fn tensor_data_past_the_end_is_rejected() {
    let dir = temp_dir();
    let mut w = GgufWriter::new();
    w.add_tensor("a", &[4], &[1.0; 4], GgmlType::F32).unwrap();
    // Declares 64 x 64 f32 but carries 16 bytes: its data would run past the end of the file.
    w.add_raw_tensor("big", &[64, 64], GgmlType::F32.id(), vec![0; 16]);
    let path = write(dir.path(), "short.gguf", &w);
    assert_err_mentions(
        GgufFile::open(&path),
        &path,
        &["tensor big", "past the end"],
    );
}

#[test]
fn absurd_counts_are_rejected_without_allocating() {
    let dir = temp_dir();
    let (w, _) = tiny_model(&TinySpec::llama(), "smollm");
    let good = w.to_bytes().unwrap();
    // Tensor count at bytes 8..16, metadata count at 16..24.
    for (at, what) in [(8, "tensor info"), (16, "metadata")] {
        let mut bad = good.clone();
        bad[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let path = dir.path().join(format!("count{at}.gguf"));
        std::fs::write(&path, &bad).unwrap();
        assert_err_mentions(load_gguf_model(&path), &path, &[what, "count"]);
    }
    // The first key's string length.
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let path = dir.path().join("strlen.gguf");
    std::fs::write(&path, &bad).unwrap();
    assert_err_mentions(load_gguf_model(&path), &path, &["string length"]);
}

/// Parses `bytes` as a model (in memory; `path` names it in errors) and loads every tensor;
/// any error is fine, a panic is not.
fn load_everything(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let model = load_gguf_file(GgufFile::from_bytes(path, bytes.to_vec())?)?;
    for name in model.weights.tensor_names() {
        model.weights.load_f32(&name)?;
    }
    model.tokenizer.encode("hello world 123", true)?;
    Ok(())
}

fn small_quantised_model() -> Vec<u8> {
    // A valid model whose last tensors are quantised, so that truncation and flips reach
    // quantised data too.
    let (mut w, _) = tiny_model(&TinySpec::llama(), "smollm");
    w.add_tensor("extra.q4_1", &[1, 64], &[0.25; 64], GgmlType::Q4_1)
        .unwrap()
        .add_tensor("extra.q8_0", &[1, 32], &[0.5; 32], GgmlType::Q8_0)
        .unwrap();
    w.to_bytes().unwrap()
}

#[test]
fn truncated_files_give_errors_not_panics() {
    let dir = temp_dir();
    let good = small_quantised_model();
    let path = dir.path().join("truncated.gguf");
    load_everything(&path, &good).expect("the untruncated file loads");
    // Every length through the metadata and tensor table, then every 61st (in memory: the
    // parser is the same; a few real files below go through the memory map).
    let mut len = 0;
    while len < good.len() {
        match std::panic::catch_unwind(|| load_everything(&path, &good[..len])) {
            Err(_) => panic!("loading the file truncated to {len} bytes panicked"),
            Ok(r) => assert_err_mentions(r, &path, &["truncated"]),
        }
        len += if len < 8000 { 1 } else { 61 };
    }
    for len in [0, 3, 24, 1000, good.len() - 1] {
        std::fs::write(&path, &good[..len]).unwrap();
        assert_err_mentions(load_gguf_model(&path), &path, &["truncated"]);
    }
}

#[test]
fn flipped_bytes_give_errors_or_values_never_panics() {
    let dir = temp_dir();
    let good = small_quantised_model();
    let path = dir.path().join("flipped.gguf");
    let data_start = GgufFile::from_bytes(&path, good.clone())
        .unwrap()
        .data_offset();
    let patterns = [0xFFu8, 0x80, 0x01, 0x10];
    let mut errors = 0;
    let mut pos = 0;
    while pos < good.len() {
        let pattern = patterns[pos % patterns.len()];
        let mut bad = good.clone();
        bad[pos] ^= pattern;
        match std::panic::catch_unwind(|| load_everything(&path, &bad)) {
            Err(_) => panic!("loading with byte {pos} xor {pattern:#x} panicked"),
            Ok(Err(e)) => {
                errors += 1;
                let msg = format!("{e:#}");
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
            Ok(Ok(())) => {}
        }
        // Every byte of the header, metadata and tensor table; every 97th of the tensor data.
        pos += if pos < data_start { 1 } else { 97 };
    }
    assert!(errors > 1000, "only {errors} flips were detected");
}

// ---------------------------------------------------------------------------------------------
// The real default model (fetched on first use)
// ---------------------------------------------------------------------------------------------

#[test]
fn real_default_model() {
    // The default model, fetched into $GENIUS_HOME on first use.
    let path = genius_engine::model::fetch::ensure_model(
        genius_engine::model::fetch::known_model(genius_engine::model::fetch::DEFAULT_MODEL)
            .expect("default model is known"),
    )
    .expect("default model");
    let start = std::time::Instant::now();
    let model = load_gguf_model(&path).unwrap();
    let opened = start.elapsed();
    let c = &model.config;
    assert_eq!(c.arch, Architecture::Llama);
    assert_eq!(
        (c.num_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, 1e-5));
    assert_eq!((c.vocab_size, c.max_position_embeddings), (49152, 8192));
    assert!(c.tie_word_embeddings && !c.attention_bias);
    let counts = model.weights.dtype_counts();
    assert_eq!(counts.get("Q4_1"), Some(&210));
    assert_eq!(counts.get("F32"), Some(&61));
    assert_eq!(counts.get("Q8_0"), Some(&1));

    let tok = &model.tokenizer;
    let text = "What is the capital of France?";
    let ids = tok.encode(text, true).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    eprintln!("{text:?} -> {ids:?} {pieces:?}");
    assert_eq!(
        pieces,
        ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert_eq!(tok.encode("2024", false).unwrap().len(), 4);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.eos_ids, vec![2]);
    let chat = tok
        .apply_chat_template(
            &serde_json::json!([{"role": "user", "content": text}]),
            true,
        )
        .unwrap();
    assert!(chat.starts_with("<|im_start|>system\n"), "{chat}");
    assert!(chat.ends_with("<|im_start|>assistant\n"), "{chat}");
    let chat_ids = tok.encode(&chat, false).unwrap();
    assert_eq!(chat_ids[0], 1);
    assert_eq!(tok.decode(&chat_ids).unwrap(), chat);

    let start = std::time::Instant::now();
    let mut values = 0;
    for name in model.weights.tensor_names() {
        values += model.weights.load_f32(&name).unwrap().numel();
    }
    eprintln!(
        "real model: opened (config + tokenizer) in {:.0} ms, dequantised {values} values in \
         {:.0} ms",
        opened.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(values, c.num_parameters());
}
