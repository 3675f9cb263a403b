//! `TextTokenizer::from_hf_dir`: Hugging Face tokenizer directories.
//!
//! Most tests build a tiny WordLevel `tokenizer.json` in a temporary directory. The tests named
//! `real_*` use the real LLaMA-3 and Qwen tokenizer files from the directory named by the
//! environment variable `GENIUS_TEST_TOKENIZERS` (fill it with
//! `tools/fetch-test-tokenizers.sh DIR`) at build time; without it they are reported as ignored.

use genius_engine::model::TextTokenizer;
use genius_engine::model::chat_template::render_chat_template;
use serde_json::json;
use std::path::{Path, PathBuf};

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>\\n' }}{% endfor %}\
                      {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Ids of the tiny tokenizer's vocabulary.
const UNK: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;
const IM_START: u32 = 3;
const IM_END: u32 = 4;
const EOT: u32 = 5;
const HELLO: u32 = 6;
const WORLD: u32 = 7;
const USER: u32 = 8;
const ASSISTANT: u32 = 9;
const BANG: u32 = 10;

/// A WordLevel `tokenizer.json` (whitespace/punctuation pre-tokenizer) whose post-processor
/// prepends `<s>` when `with_bos_post_processor`, like LLaMA's.
fn tiny_tokenizer_json(with_bos_post_processor: bool) -> serde_json::Value {
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let post_processor = if with_bos_post_processor {
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        })
    } else {
        serde_json::Value::Null
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            special(UNK, "<unk>"), special(BOS, "<s>"), special(EOS, "</s>"),
            special(IM_START, "<|im_start|>"), special(IM_END, "<|im_end|>"), special(EOT, "<|eot|>")
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": post_processor,
        "decoder": null,
        "model": {
            "type": "WordLevel",
            "vocab": {
                "<unk>": UNK, "<s>": BOS, "</s>": EOS, "<|im_start|>": IM_START,
                "<|im_end|>": IM_END, "<|eot|>": EOT, "hello": HELLO, "world": WORLD,
                "user": USER, "assistant": ASSISTANT, "!": BANG
            },
            "unk_token": "<unk>"
        }
    })
}

/// A temporary model directory holding the given files.
fn model_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).expect("write fixture file");
    }
    dir
}

fn tiny_tokenizer() -> (&'static str, String) {
    ("tokenizer.json", tiny_tokenizer_json(true).to_string())
}

fn load(dir: &tempfile::TempDir) -> TextTokenizer {
    TextTokenizer::from_hf_dir(dir.path()).unwrap_or_else(|e| panic!("from_hf_dir: {e:#}"))
}

fn load_error(dir: &tempfile::TempDir) -> String {
    match TextTokenizer::from_hf_dir(dir.path()) {
        Ok(_) => panic!("from_hf_dir should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

fn user_hello() -> serde_json::Value {
    json!([{"role": "user", "content": "hello"}])
}

// ---------------------------------------------------------------- tokenizer_config and friends

#[test]
fn reads_special_tokens_template_and_generation_eos_ids() {
    let config = json!({
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false,
                      "normalized": false, "rstrip": false, "single_word": false},
        "chat_template": CHATML
    });
    let generation = json!({"bos_token_id": BOS, "eos_token_id": [EOS, EOT]});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
        ("generation_config.json", generation.to_string()),
    ]);
    let tokenizer = load(&dir);
    assert_eq!(tokenizer.bos_token, Some(("<s>".to_string(), BOS)));
    assert_eq!(
        tokenizer.eos_token,
        Some(("<|im_end|>".to_string(), IM_END))
    );
    // The EOS token first, then generation_config's ids.
    assert_eq!(tokenizer.eos_ids, vec![IM_END, EOS, EOT]);
    assert_eq!(tokenizer.chat_template.as_deref(), Some(CHATML));
    assert_eq!(tokenizer.origin, dir.path().join("tokenizer.json"));
}

#[test]
fn chat_template_list_takes_default_and_bos_may_be_an_added_token_object() {
    let config = json!({
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": CHATML}
        ]
    });
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
    ]);
    let tokenizer = load(&dir);
    assert_eq!(tokenizer.chat_template.as_deref(), Some(CHATML));
    assert_eq!(tokenizer.bos_token, Some(("<s>".to_string(), BOS)));
    assert_eq!(tokenizer.eos_token, Some(("</s>".to_string(), EOS)));
    assert_eq!(tokenizer.eos_ids, vec![EOS]);
}

#[test]
fn chat_template_jinja_file_wins_over_tokenizer_config() {
    let config = json!({"eos_token": "</s>", "chat_template": "FROM CONFIG"});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
        ("chat_template.jinja", format!("{CHATML}\n")),
    ]);
    let tokenizer = load(&dir);
    assert_eq!(tokenizer.chat_template, Some(format!("{CHATML}\n")));
    let prompt = tokenizer.apply_chat_template(&user_hello(), true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn generation_config_alone_names_bos_and_eos() {
    let generation = json!({"bos_token_id": BOS, "eos_token_id": EOS});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("generation_config.json", generation.to_string()),
    ]);
    let tokenizer = load(&dir);
    assert_eq!(tokenizer.bos_token, Some(("<s>".to_string(), BOS)));
    assert_eq!(tokenizer.eos_token, Some(("</s>".to_string(), EOS)));
    assert_eq!(tokenizer.eos_ids, vec![EOS]);
    assert_eq!(tokenizer.chat_template, None);
    let err = tokenizer
        .apply_chat_template(&user_hello(), true)
        .unwrap_err();
    assert!(format!("{err:#}").contains("no chat template"), "{err:#}");
}

#[test]
fn null_special_tokens_in_tokenizer_config_mean_none() {
    // Qwen's tokenizer_config.json says `"bos_token": null`; generation_config's
    // bos_token_id does not override that (transformers' template sees no bos_token).
    let config = json!({"bos_token": null, "eos_token": "<|im_end|>", "chat_template": CHATML});
    let generation = json!({"bos_token_id": BOS, "eos_token_id": [IM_END, EOS]});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
        ("generation_config.json", generation.to_string()),
    ]);
    let tokenizer = load(&dir);
    assert_eq!(tokenizer.bos_token, None);
    assert_eq!(tokenizer.eos_ids, vec![IM_END, EOS]);
}

// ---------------------------------------------------------------- encoding

#[test]
fn plain_prompts_get_what_the_post_processor_adds() {
    let with_bos = model_dir(&[tiny_tokenizer()]);
    let tokenizer = load(&with_bos);
    assert_eq!(
        tokenizer.encode("hello world!", true).unwrap(),
        vec![BOS, HELLO, WORLD, BANG]
    );
    assert_eq!(
        tokenizer.encode("hello world!", false).unwrap(),
        vec![HELLO, WORLD, BANG]
    );

    let without_bos = model_dir(&[("tokenizer.json", tiny_tokenizer_json(false).to_string())]);
    let tokenizer = load(&without_bos);
    assert_eq!(
        tokenizer.encode("hello world!", true).unwrap(),
        vec![HELLO, WORLD, BANG]
    );
}

#[test]
fn chat_prompts_encode_special_tokens_as_single_ids() {
    let config = json!({"eos_token": "<|im_end|>", "chat_template": CHATML});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
    ]);
    let tokenizer = load(&dir);
    let prompt = tokenizer.apply_chat_template(&user_hello(), true).unwrap();
    assert_eq!(
        tokenizer.encode(&prompt, false).unwrap(),
        vec![IM_START, USER, HELLO, IM_END, IM_START, ASSISTANT]
    );
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(IM_END));
    assert_eq!(tokenizer.id_to_token(HELLO).as_deref(), Some("hello"));
    assert_eq!(tokenizer.vocab_size(), 11);
}

// ---------------------------------------------------------------- bad input

#[test]
fn missing_tokenizer_json_is_an_error_naming_the_path() {
    let dir = model_dir(&[("tokenizer_config.json", "{}".to_string())]);
    let message = load_error(&dir);
    let path = dir.path().join("tokenizer.json");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("missing"), "{message}");
}

#[test]
fn malformed_tokenizer_json_is_an_error_naming_the_file() {
    let dir = model_dir(&[("tokenizer.json", "{\"model\": [1, 2".to_string())]);
    let message = load_error(&dir);
    assert!(
        message.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{message}"
    );
    assert!(message.contains("not a valid tokenizer.json"), "{message}");
}

#[test]
fn malformed_tokenizer_config_is_an_error_naming_the_file() {
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", "{\"eos_token\": ".to_string()),
    ]);
    let message = load_error(&dir);
    assert!(
        message.contains(
            &dir.path()
                .join("tokenizer_config.json")
                .display()
                .to_string()
        ),
        "{message}"
    );
    assert!(message.contains("malformed JSON"), "{message}");
}

#[test]
fn malformed_generation_config_is_an_error_naming_the_file() {
    let dir = model_dir(&[
        tiny_tokenizer(),
        (
            "generation_config.json",
            json!({"eos_token_id": "two"}).to_string(),
        ),
    ]);
    let message = load_error(&dir);
    assert!(message.contains("generation_config.json"), "{message}");
    assert!(message.contains("eos_token_id"), "{message}");
}

#[test]
fn template_syntax_error_names_the_file_and_the_problem() {
    let config = json!({"chat_template": "{% for m in messages %}{{ m.content }"});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
    ]);
    let message = load_error(&dir);
    assert!(message.contains("tokenizer_config.json"), "{message}");
    assert!(message.contains("syntax error"), "{message}");

    let dir = model_dir(&[
        tiny_tokenizer(),
        ("chat_template.jinja", "{% if %}".to_string()),
    ]);
    let message = load_error(&dir);
    assert!(message.contains("chat_template.jinja"), "{message}");
    assert!(message.contains("syntax error"), "{message}");
}

#[test]
fn raise_exception_in_a_template_names_the_file_and_the_message() {
    let template = "{% for m in messages %}{% if m.role == 'system' %}\
                    {{ raise_exception('System role not supported') }}{% endif %}{% endfor %}";
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("chat_template.jinja", template.to_string()),
    ]);
    let tokenizer = load(&dir);
    let messages = json!([{"role": "system", "content": "x"}]);
    let err = tokenizer.apply_chat_template(&messages, true).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("chat_template.jinja"), "{message}");
    assert!(message.contains("System role not supported"), "{message}");
}

#[test]
fn special_token_missing_from_the_vocabulary_is_an_error() {
    let config = json!({"eos_token": "<|not_there|>"});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
    ]);
    let message = load_error(&dir);
    assert!(message.contains("tokenizer_config.json"), "{message}");
    assert!(message.contains("<|not_there|>"), "{message}");
}

#[test]
fn chat_template_list_without_default_is_an_error() {
    let config = json!({"chat_template": [{"name": "tool_use", "template": "x"}]});
    let dir = model_dir(&[
        tiny_tokenizer(),
        ("tokenizer_config.json", config.to_string()),
    ]);
    let message = load_error(&dir);
    assert!(message.contains("tokenizer_config.json"), "{message}");
    assert!(message.contains("default"), "{message}");
    assert!(message.contains("tool_use"), "{message}");
}

// ---------------------------------------------------------------- real tokenizers

/// `$GENIUS_TEST_TOKENIZERS/<name>`. Tests that need it
/// are marked ignored (with the reason) in builds without the variable, so `cargo test` reports
/// them as ignored rather than passed; a set variable pointing at an incomplete directory fails.
fn real_tokenizer_dir(name: &str) -> PathBuf {
    let root = std::env::var("GENIUS_TEST_TOKENIZERS")
        .expect("GENIUS_TEST_TOKENIZERS was set when the tests were built; set it to run them");
    let root = root.as_str();
    let dir = Path::new(root).join(name);
    assert!(
        dir.join("tokenizer.json").is_file(),
        "GENIUS_TEST_TOKENIZERS is set but {} has no tokenizer.json; run \
         tools/fetch-test-tokenizers.sh {}",
        dir.display(),
        Path::new(root).display()
    );
    dir
}

fn load_real(dir: &Path) -> TextTokenizer {
    TextTokenizer::from_hf_dir(dir).unwrap_or_else(|e| panic!("from_hf_dir: {e:#}"))
}

// LLaMA-3 ids (tiktoken-style BPE, digits grouped by three): "Hello" 9906, " world" 1917,
// "!" 0, " " 220, "123" 4513, "45" 1774, "user" 882, "assistant" 78191, "\n\n" 271.
const LLAMA3_HELLO_WORLD_12345: [u32; 6] = [9906, 1917, 0, 220, 4513, 1774];
const BEGIN_OF_TEXT: u32 = 128000;
const END_OF_TEXT: u32 = 128001;
const START_HEADER: u32 = 128006;
const END_HEADER: u32 = 128007;
const EOT_ID: u32 = 128009;

#[test]
#[cfg_attr(
    not(genius_test_tokenizers),
    ignore = "needs GENIUS_TEST_TOKENIZERS (fill a directory with tools/fetch-test-tokenizers.sh DIR)"
)]
fn real_llama3_tokenizer_encodes_like_transformers() {
    let dir = real_tokenizer_dir("llama3");
    let tokenizer = load_real(&dir);
    assert_eq!(
        tokenizer.bos_token,
        Some(("<|begin_of_text|>".to_string(), BEGIN_OF_TEXT))
    );
    assert_eq!(
        tokenizer.eos_token,
        Some(("<|end_of_text|>".to_string(), END_OF_TEXT))
    );
    // This (first-release) tokenizer.json's post-processor is ByteLevel only, so transformers'
    // add_special_tokens=True adds nothing: no BOS is hard-coded for LLaMA.
    assert_eq!(
        tokenizer.encode("Hello world! 12345", true).unwrap(),
        LLAMA3_HELLO_WORLD_12345
    );

    let prompt =
        tokenizer.apply_chat_template(&json!([{"role": "user", "content": "Hello"}]), true);
    let prompt = prompt.unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(
        ids,
        vec![
            BEGIN_OF_TEXT,
            START_HEADER,
            882,
            END_HEADER,
            271,
            9906,
            EOT_ID,
            START_HEADER,
            78191,
            END_HEADER,
            271
        ]
    );
    assert_eq!(tokenizer.decode(&ids).unwrap(), prompt);
}

#[test]
#[cfg_attr(
    not(genius_test_tokenizers),
    ignore = "needs GENIUS_TEST_TOKENIZERS (fill a directory with tools/fetch-test-tokenizers.sh DIR)"
)]
fn real_llama3_tokenizer_with_a_bos_post_processor_prepends_begin_of_text() {
    let dir = real_tokenizer_dir("llama3");
    // The post-processor of meta-llama's current tokenizer.json files (ByteLevel, then a
    // template that prepends <|begin_of_text|>).
    let text = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    let mut tokenizer_json: serde_json::Value = serde_json::from_str(&text).unwrap();
    tokenizer_json["post_processor"] = json!({
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                                "ids": [BEGIN_OF_TEXT], "tokens": ["<|begin_of_text|>"]}}}
        ]
    });
    let patched = model_dir(&[("tokenizer.json", tokenizer_json.to_string())]);
    let tokenizer = load(&patched);
    let mut expected = vec![BEGIN_OF_TEXT];
    expected.extend(LLAMA3_HELLO_WORLD_12345);
    assert_eq!(
        tokenizer.encode("Hello world! 12345", true).unwrap(),
        expected
    );
    assert_eq!(
        tokenizer.encode("Hello world! 12345", false).unwrap(),
        LLAMA3_HELLO_WORLD_12345
    );
}

#[test]
#[cfg_attr(
    not(genius_test_tokenizers),
    ignore = "needs GENIUS_TEST_TOKENIZERS (fill a directory with tools/fetch-test-tokenizers.sh DIR)"
)]
fn real_llama31_template_prompt_encodes_special_tokens_as_single_ids() {
    let dir = real_tokenizer_dir("llama3");
    let tokenizer = load_real(&dir);
    let template = include_str!("fixtures/chat_templates/llama3.1-instruct.jinja");
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let prompt =
        render_chat_template(template, &messages, true, Some("<|begin_of_text|>"), None).unwrap();
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(ids[..2], [BEGIN_OF_TEXT, START_HEADER]);
    assert_eq!(ids.iter().filter(|&&id| id == START_HEADER).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == END_HEADER).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == EOT_ID).count(), 2);
    assert_eq!(ids[ids.len() - 4..], [START_HEADER, 78191, END_HEADER, 271]);
}

// Qwen2 BPE ids (digits one by one): "Hello" 9707, " world" 1879, "!" 0, " " 220, "1".."5"
// 16..20, "user" 872, "assistant" 77091, "system" 8948, "\n" 198.
const IM_START_QWEN: u32 = 151644;
const IM_END_QWEN: u32 = 151645;

#[test]
#[cfg_attr(
    not(genius_test_tokenizers),
    ignore = "needs GENIUS_TEST_TOKENIZERS (fill a directory with tools/fetch-test-tokenizers.sh DIR)"
)]
fn real_qwen_tokenizer_encodes_like_transformers() {
    let dir = real_tokenizer_dir("qwen3");
    let tokenizer = load_real(&dir);
    assert_eq!(tokenizer.bos_token, None);
    assert_eq!(
        tokenizer.eos_token,
        Some(("<|im_end|>".to_string(), IM_END_QWEN))
    );
    assert_eq!(
        tokenizer.encode("Hello world! 12345", true).unwrap(),
        vec![9707, 1879, 0, 220, 16, 17, 18, 19, 20]
    );

    // The package carries Qwen3's template.
    let prompt = tokenizer
        .apply_chat_template(&json!([{"role": "user", "content": "Hello"}]), true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        tokenizer.encode(&prompt, false).unwrap(),
        vec![
            IM_START_QWEN,
            872,
            198,
            9707,
            IM_END_QWEN,
            198,
            IM_START_QWEN,
            77091,
            198
        ]
    );

    // Qwen2.5-Instruct's template on the same vocabulary.
    let template = include_str!("fixtures/chat_templates/qwen2.5-instruct.jinja");
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let prompt = render_chat_template(template, &messages, true, None, Some("<|im_end|>")).unwrap();
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(ids[..3], [IM_START_QWEN, 8948, 198]);
    assert_eq!(ids.iter().filter(|&&id| id == IM_START_QWEN).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == IM_END_QWEN).count(), 2);
    assert_eq!(tokenizer.decode(&ids).unwrap(), prompt);
}
