//! Chat templates rendered with Hugging Face transformers' semantics.
//!
//! The templates under `tests/fixtures/chat_templates/` are the models' own (see the README
//! there for where each comes from). The expected strings are written by hand from each
//! model's documented prompt format, not produced by the renderer under test.

use genius_engine::model::chat_template::{
    check_chat_template, render_chat_template, render_chat_template_with, strftime_utc,
};
use serde_json::json;

const SMOLLM2: &str = include_str!("fixtures/chat_templates/smollm2-135m-instruct.jinja");
const QWEN25: &str = include_str!("fixtures/chat_templates/qwen2.5-instruct.jinja");
const QWEN3: &str = include_str!("fixtures/chat_templates/qwen3.jinja");
const LLAMA3: &str = include_str!("fixtures/chat_templates/llama3-instruct.jinja");
const LLAMA31: &str = include_str!("fixtures/chat_templates/llama3.1-instruct.jinja");

const LLAMA_BOS: Option<&str> = Some("<|begin_of_text|>");
const LLAMA_EOS: Option<&str> = Some("<|eot_id|>");
const QWEN_EOS: Option<&str> = Some("<|im_end|>");

fn render(template: &str, messages: serde_json::Value, add_generation_prompt: bool) -> String {
    render_chat_template(template, &messages, add_generation_prompt, None, None)
        .unwrap_or_else(|e| panic!("render failed: {e:#}"))
}

fn render_with(
    template: &str,
    messages: serde_json::Value,
    add_generation_prompt: bool,
    bos: Option<&str>,
    eos: Option<&str>,
    extra: serde_json::Value,
) -> Result<String, anyhow::Error> {
    let serde_json::Value::Object(extra) = extra else {
        panic!("extra variables must be a JSON object");
    };
    render_chat_template_with(template, &messages, add_generation_prompt, bos, eos, &extra)
}

fn weather_tool() -> serde_json::Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"]
            }
        }
    })
}

// ---------------------------------------------------------------- SmolLM2 (ChatML)

#[test]
fn smollm2_inserts_its_default_system_prompt() {
    let out = render(SMOLLM2, json!([{"role": "user", "content": "Hello"}]), true);
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn smollm2_keeps_a_given_system_message_and_turns() {
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}
    ]);
    assert_eq!(
        render(SMOLLM2, messages, false),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    );
}

// ---------------------------------------------------------------- Qwen2.5-Instruct

const QWEN_DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. \
                                   You are a helpful assistant.<|im_end|>\n";

#[test]
fn qwen25_inserts_the_default_system_prompt_when_none_is_given() {
    let out = render(QWEN25, json!([{"role": "user", "content": "Hello"}]), true);
    assert_eq!(
        out,
        format!("{QWEN_DEFAULT_SYSTEM}<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    );
}

#[test]
fn qwen25_uses_the_given_system_message() {
    let messages = json!([
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"}
    ]);
    assert_eq!(
        render(QWEN25, messages, true),
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn qwen25_multi_turn_with_and_without_generation_prompt() {
    let messages = json!([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}
    ]);
    let turns = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
                 <|im_start|>user\nAnd 3+3?<|im_end|>\n";
    assert_eq!(
        render(QWEN25, messages.clone(), false),
        format!("{QWEN_DEFAULT_SYSTEM}{turns}")
    );
    assert_eq!(
        render(QWEN25, messages, true),
        format!("{QWEN_DEFAULT_SYSTEM}{turns}<|im_start|>assistant\n")
    );
}

#[test]
fn qwen25_tools_and_tool_calls_render_json_like_python() {
    let messages = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ]},
        {"role": "tool", "content": "{\"temp_c\": 21.5}"}
    ]);
    let out = render_with(
        QWEN25,
        messages,
        true,
        None,
        QWEN_EOS,
        json!({"tools": [weather_tool()]}),
    )
    .unwrap();
    let expected = concat!(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
        r#"{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#,
        "\n</tools>\n\nFor each function call, return a json object with function name and ",
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n",
        r#"{"name": <function-name>, "arguments": <args-json-object>}"#,
        "\n</tool_call><|im_end|>\n",
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
        "<|im_start|>assistant\n<tool_call>\n",
        r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#,
        "\n</tool_call><|im_end|>\n",
        "<|im_start|>user\n<tool_response>\n",
        r#"{"temp_c": 21.5}"#,
        "\n</tool_response><|im_end|>\n",
        "<|im_start|>assistant\n"
    );
    assert_eq!(out, expected);
}

// ---------------------------------------------------------------- Qwen3 (Python string methods)

#[test]
fn qwen3_drops_past_reasoning_and_honours_enable_thinking() {
    let messages = json!([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"}
    ]);
    let out = render_with(
        QWEN3,
        messages,
        true,
        None,
        QWEN_EOS,
        json!({"enable_thinking": false}),
    )
    .unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
         <|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
}

#[test]
fn qwen3_keeps_the_reasoning_of_the_final_answer() {
    let messages = json!([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n4"}
    ]);
    assert_eq!(
        render(QWEN3, messages, false),
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n<think>\nTwo plus two.\n</think>\n\n4<|im_end|>\n"
    );
}

// ---------------------------------------------------------------- LLaMA-3 / 3.1 Instruct

#[test]
fn llama3_trims_content_starts_with_bos_and_always_adds_the_assistant_header() {
    // The original Meta-Llama-3-Instruct template has no `add_generation_prompt` switch.
    let messages = json!([
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "  Hello there \n"}
    ]);
    let out = render_chat_template(LLAMA3, &messages, false, LLAMA_BOS, LLAMA_EOS).unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn llama31_writes_the_cutting_knowledge_system_block_without_a_system_message() {
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let out = render_chat_template(LLAMA31, &messages, true, LLAMA_BOS, LLAMA_EOS).unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn llama31_puts_the_system_message_after_the_dates_and_renders_turns() {
    let messages = json!([
        {"role": "system", "content": "You are a helpful assistant. "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}
    ]);
    let out = render_chat_template(LLAMA31, &messages, false, LLAMA_BOS, LLAMA_EOS).unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
         You are a helpful assistant.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    );
}

#[test]
fn llama31_takes_date_string_from_the_caller() {
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let out = render_with(
        LLAMA31,
        messages,
        false,
        LLAMA_BOS,
        LLAMA_EOS,
        json!({"date_string": "01 Jan 2025"}),
    )
    .unwrap();
    assert!(
        out.contains("Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n"),
        "{out}"
    );
}

#[test]
fn llama31_tools_in_the_first_user_message_as_indented_json() {
    let messages = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let out = render_with(
        LLAMA31,
        messages,
        true,
        LLAMA_BOS,
        LLAMA_EOS,
        json!({"tools": [weather_tool()]}),
    )
    .unwrap();
    let tool_json = r#"{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {
                    "type": "string"
                }
            },
            "required": [
                "city"
            ]
        }
    }
}"#;
    let expected = format!(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
         <|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
         Given the following functions, please respond with a JSON for a function call with its \
         proper arguments that best answers the given prompt.\n\n\
         Respond in the format {{\"name\": function name, \"parameters\": dictionary of argument \
         name and its value}}.Do not use variables.\n\n{tool_json}\n\n\
         What is the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(out, expected);
}

#[test]
fn llama31_raise_exception_rejects_parallel_tool_calls() {
    let call = json!({"type": "function", "function": {"name": "f", "arguments": {}}});
    let messages = json!([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [call.clone(), call]}
    ]);
    let err = render_chat_template(LLAMA31, &messages, false, LLAMA_BOS, LLAMA_EOS).unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("This model only supports single tool-calls at once!"),
        "{message}"
    );
}

// ---------------------------------------------------------------- Jinja semantics of HF

#[test]
fn blocks_are_trimmed_and_lstripped_and_one_trailing_newline_is_dropped() {
    let template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n    U: {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    let out = render(
        template,
        json!([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),
        false,
    );
    assert_eq!(out, "    U: a\n");
    assert_eq!(render("x\n\n", json!([]), false), "x\n");
    assert_eq!(render("{{ 'x' }}\n", json!([]), false), "x");
}

#[test]
fn generation_blocks_render_their_body_with_their_whitespace_control() {
    let template = "{% for m in messages %}\n{% if m.role == 'assistant' %}\n\
                    {%- generation -%}\n  {{ m.content }}  \n{%- endgeneration %}\n\
                    {% else %}\n{{ m.content }}|\n{% endif %}\n{% endfor %}";
    let messages = json!([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}
    ]);
    assert_eq!(render(template, messages, false), "hi|\nyo");
}

#[test]
fn loop_controls_break_and_continue() {
    let template = "{% for m in messages %}{% if m == 2 %}{% continue %}{% endif %}\
                    {% if m == 4 %}{% break %}{% endif %}{{ m }}{% endfor %}";
    assert_eq!(render(template, json!([1, 2, 3, 4, 5]), false), "13");
}

#[test]
fn python_string_and_dict_methods_work() {
    let template = concat!(
        "{% set m = messages[0] %}",
        "[{{ m.text.strip() }}][{{ m.text.lstrip() }}][{{ m.text.rstrip() }}]",
        "[{{ m.text.strip(' \\n') }}][{{ 'xxhixx'.strip('x') }}]",
        "[{{ m.word.startswith('He') }}|{{ m.word.endswith('lo') }}|{{ m.word.startswith(('A', 'H')) }}]",
        "[{{ 'a,b,,c'.split(',') | join('/') }}][{{ ' a  b '.split() | join('/') }}]",
        "[{{ 'a</think>b'.split('</think>')[-1] }}][{{ 'a b c'.split(' ', 1)[1] }}]",
        "[{{ m.word.upper() }}|{{ m.word.lower() }}|{{ 'hello world'.title() }}]",
        "[{{ m.word.replace('l', 'L') }}|{{ 'x'.join(['a', 'b']) }}]",
        "[{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}]",
        "[{{ m.get('word') }}|{{ m.get('missing', 'dflt') }}|{{ m.get('missing') is none }}]",
        "[{% for k in m.keys() %}{{ k }}{% endfor %}][{{ messages[::-1][0] == messages[-1] }}]",
    );
    let out = render(
        template,
        json!([{"text": "  hi \n", "word": "Hello"}, {"z": 1}]),
        false,
    );
    assert_eq!(
        out,
        "[hi][hi \n][  hi][hi][hi][True|True|True][a/b//c][a/b][b][b c]\
         [HELLO|hello|Hello World][HeLLo|axb][text=  hi \n;word=Hello;]\
         [Hello|dflt|True][textword][True]"
    );
}

#[test]
fn special_tokens_tools_and_documents_follow_transformers() {
    let template = "{{ bos_token is defined }} {{ eos_token }} {{ tools is none }} \
                    {{ documents is none }} {{ custom is defined }}";
    let out = render_chat_template(template, &json!([]), false, None, Some("</s>")).unwrap();
    assert_eq!(out, "False </s> True True False");
    let out = render_chat_template(template, &json!([]), false, Some("<s>"), None).unwrap();
    assert_eq!(out, "True  True True False");
}

#[test]
fn tojson_matches_python_json_dumps() {
    let data = json!([{
        "z": "Météo à Paris — 21°C",
        "a": [1, 2.5, 1e20, 1.5e-7, 100.0, -0.25, true, null],
        "esc": "quote\" back\\ nl\n tab\t bell\u{7}",
        "empty": {}, "list": []
    }]);
    let out = render("{{ messages[0] | tojson }}", data.clone(), false);
    assert_eq!(
        out,
        r#"{"z": "Météo à Paris — 21°C", "a": [1, 2.5, 1e+20, 1.5e-07, 100.0, -0.25, true, null], "esc": "quote\" back\\ nl\n tab\t bell\u0007", "empty": {}, "list": []}"#
    );
    let out = render(
        "{{ messages[0].a[:2] | tojson(indent=2) }}|{{ messages[0].z | tojson(ensure_ascii=true) }}",
        data.clone(),
        false,
    );
    assert_eq!(
        out,
        "[\n  1,\n  2.5\n]|\"M\\u00e9t\\u00e9o \\u00e0 Paris \\u2014 21\\u00b0C\""
    );
    let out = render(
        "{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=true, separators=(',', ':')) }}",
        json!([]),
        false,
    );
    assert_eq!(out, r#"{"a":[1,2],"b":1}"#);
}

#[test]
fn raise_exception_fails_the_render_with_its_message() {
    let template = "{% if messages[0].role != 'user' %}\
                    {{ raise_exception('Conversation roles must alternate user/assistant') }}\
                    {% endif %}ok";
    let err = render_chat_template(
        template,
        &json!([{"role": "assistant", "content": "x"}]),
        false,
        None,
        None,
    )
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("Conversation roles must alternate user/assistant"),
        "{message}"
    );
    assert_eq!(
        render(template, json!([{"role": "user", "content": "x"}]), false),
        "ok"
    );
}

#[test]
fn syntax_errors_are_reported_with_their_line() {
    let template = "{% for m in messages %}\n{{ m.content }\n{% endfor %}";
    let err = check_chat_template(template).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("syntax error"), "{message}");
    assert!(message.contains("chat_template:2"), "{message}");
    let err = render_chat_template(template, &json!([]), false, None, None).unwrap_err();
    assert!(format!("{err:#}").contains("syntax error"));
}

#[test]
fn unknown_methods_and_undefined_attributes_are_errors_not_panics() {
    let err = render_chat_template("{{ 'x'.no_such_method() }}", &json!([]), false, None, None)
        .unwrap_err();
    assert!(format!("{err:#}").contains("no_such_method"), "{err:#}");
    let err =
        render_chat_template("{{ nothing.attr }}", &json!([]), false, None, None).unwrap_err();
    assert!(format!("{err:#}").contains("undefined"), "{err:#}");
    // Malformed block tags near `generation` (the `{% generation %}` rewrite reads them).
    for template in [
        "{%}generation",
        "{%-}",
        "{% generation",
        "{%%}{{ add_generation_prompt }}",
    ] {
        assert!(
            check_chat_template(template).is_err(),
            "{template:?} should not compile"
        );
    }
    let err = render_chat_template(
        "{{ {'a': 1} | tojson(indent=100000000) }}",
        &json!([]),
        false,
        None,
        None,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("indent"), "{err:#}");
}

#[test]
fn strftime_formats_like_python() {
    // 2024-07-26 00:00:00 UTC was a Friday.
    let friday = 1_721_952_000;
    assert_eq!(strftime_utc("%d %b %Y", friday), "26 Jul 2024");
    assert_eq!(
        strftime_utc(
            "%A %B %-d, %Y %H:%M:%S %p %j %y %%",
            friday + 13 * 3600 + 62
        ),
        "Friday July 26, 2024 13:01:02 PM 208 24 %"
    );
    assert_eq!(strftime_utc("%F %T", 0), "1970-01-01 00:00:00");
    assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");

    let today = render("{{ strftime_now('%d %b %Y') }}", json!([]), false);
    let parts: Vec<&str> = today.split(' ').collect();
    assert_eq!(parts.len(), 3, "{today}");
    assert!(parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()));
    assert!(parts[2].len() == 4 && parts[2].starts_with("20"), "{today}");
    let defined = render("{{ strftime_now is defined }}", json!([]), false);
    assert_eq!(defined, "True");
}

#[test]
fn compiled_templates_are_cached_by_their_text() {
    // Interleave two templates: each render must use its own compiled template.
    for _ in 0..3 {
        assert_eq!(render("A{{ messages | length }}", json!([1]), false), "A1");
        assert_eq!(
            render("B{{ messages | length }}", json!([1, 2]), false),
            "B2"
        );
    }
}
