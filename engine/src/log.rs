//! The engine's one log sink. Libraries must not decide where an appliance's logs go, so the
//! sink is settable once; until then lines go to stderr prefixed with `tandem:`.

use std::sync::OnceLock;

type Sink = Box<dyn Fn(&str) + Send + Sync>;
static SINK: OnceLock<Sink> = OnceLock::new();

/// Route the engine's log lines to `sink`. Only the first call takes effect; returns whether
/// this one did.
pub fn set_sink(sink: impl Fn(&str) + Send + Sync + 'static) -> bool {
    SINK.set(Box::new(sink)).is_ok()
}

/// Emit one log line.
pub fn line(message: &str) {
    match SINK.get() {
        Some(sink) => sink(message),
        None => eprintln!("tandem: {message}"),
    }
}
