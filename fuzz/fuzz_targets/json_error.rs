//! The API's JSON error description (`keymint_proto::json_error`): any body
//! parsed as one of keymint's request types, and the error told back.
//!
//! Checked: the description never repeats the caller's value. The seeds
//! (and the dictionary) put the marker `SECRETVALUE` in keys, values and
//! variant names; the fuzzer moves it around. A marker in the description
//! is an echo (no type of keymint's has a field or variant of that name).
//! The description is also printable ASCII, so no caller-supplied text of
//! any other kind slips through.
#![no_main]

use keymint_proto::json_error::{JsonErrorKind, describe_json_error, describe_serde_message};
use keymint_proto::{EndTask, IssueLease, StartTask};
use libfuzzer_sys::fuzz_target;

fn check(message: &str) {
    assert!(
        !message.to_ascii_lowercase().contains("secretvalue"),
        "the caller's value was echoed: {message}"
    );
    assert!(
        message.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "not printable ASCII: {message:?}"
    );
}

fn describe<T: serde::de::DeserializeOwned>(data: &[u8]) {
    if let Err(e) = serde_json::from_slice::<T>(data) {
        let (kind, message) = describe_json_error(&e);
        assert_eq!(kind == JsonErrorKind::Syntax, e.is_syntax() || e.is_eof() || e.is_io());
        check(&message);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => describe::<StartTask>(body),
        1 => describe::<IssueLease>(body),
        2 => describe::<EndTask>(body),
        _ => {
            // The query-string path: serde_urlencoded's messages.
            let Ok(q) = std::str::from_utf8(body) else {
                return;
            };
            if let Err(e) = serde_urlencoded::from_str::<EndTask>(q) {
                let m = e.to_string();
                let (what, expected) = describe_serde_message(&m);
                check(&what);
                if let Some(x) = expected {
                    check(x);
                }
            }
        }
    }
});
