//! Renders a model's own Jinja chat template with Hugging Face's semantics (minijinja).

use anyhow::Result;

/// Renders `template` for `messages` with `add_generation_prompt`, `bos_token`, `eos_token`.
pub fn render_chat_template(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", template)?;
    let ctx = minijinja::context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    Ok(env.get_template("chat")?.render(ctx)?)
}
