//! Any request body: refused with an `InvalidRequest` or parsed within the
//! shipped limits, never a panic.

#![no_main]

use std::sync::LazyLock;

use embgate::config::Settings;
use embgate::protocol::{Limits, parse_request};
use libfuzzer_sys::fuzz_target;

static LIMITS: LazyLock<Limits> = LazyLock::new(|| {
    Settings::load_from(None, Some(Default::default()))
        .expect("the defaults load")
        .limits
        .request()
});

fuzz_target!(|body: &[u8]| {
    let limits = *LIMITS;
    let Ok(r) = parse_request(body, limits) else {
        return;
    };
    assert!(!r.model.is_empty() && r.model.len() <= limits.max_model_bytes);
    assert!(!r.inputs.is_empty() && r.inputs.len() <= limits.max_inputs);
    assert!(r.inputs.iter().all(|i| i.byte_len() > 0));
    assert!(r.extra.len() <= limits.max_extra_fields);
    assert!(r.extra.windows(2).all(|w| w[0].0 < w[1].0));
});
