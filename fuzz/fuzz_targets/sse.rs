//! The SSE metering parser (`keymint_proxy::sse::EventReader`): an upstream's
//! event stream cut into chunks at fuzzer-chosen places.
//!
//! Byte 0 chooses the endpoint and whether OpenAI's usage chunk is stripped;
//! byte 1 seeds the chunk sizes. Checked: without stripping every chunk
//! passes unchanged; with it, the stream passed on is the input with whole
//! events left out (a subsequence of the events); and the usage read does
//! not depend on where the chunks were cut (the same stream in one chunk
//! reads the same).
#![no_main]

use bytes::Bytes;
use keymint_proxy::provider::Endpoint;
use keymint_proxy::sse::EventReader;
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [Endpoint; 6] = [
    Endpoint::ChatCompletions,
    Endpoint::Responses,
    Endpoint::Embeddings,
    Endpoint::Models,
    Endpoint::Messages,
    Endpoint::CountTokens,
];

fn run(ep: Endpoint, strip: bool, stream: &[u8], cuts: &mut impl Iterator<Item = usize>) -> (Vec<u8>, Option<(u64, u64)>) {
    let mut r = EventReader::new(ep, strip);
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        let passed = r.process(Bytes::copy_from_slice(chunk));
        if !strip {
            assert_eq!(&passed[..], chunk, "a chunk was changed without stripping");
        }
        out.extend_from_slice(&passed);
        rest = tail;
    }
    if let Some(t) = r.finish() {
        assert!(strip, "a tail came back without stripping");
        out.extend_from_slice(&t);
    }
    (out, r.usage())
}

fuzz_target!(|data: &[u8]| {
    let [mode, seed, stream @ ..] = data else {
        return;
    };
    let ep = ENDPOINTS[usize::from(mode % 6)];
    let strip = mode & 0x80 != 0;
    let mut x = u32::from(*seed) | 1;
    let mut cuts = std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        Some((x % 64) as usize + 1)
    });
    let (chunked_out, chunked_usage) = run(ep, strip, stream, &mut cuts);
    let (whole_out, whole_usage) = run(ep, strip, stream, &mut std::iter::empty());
    assert_eq!(chunked_usage, whole_usage, "usage depends on chunking");
    if strip {
        assert_eq!(chunked_out, whole_out, "output depends on chunking");
        // Output is the input with some events removed: a subsequence.
        let mut it = stream.iter();
        assert!(
            chunked_out.iter().all(|b| it.any(|s| s == b)),
            "output is not a subsequence of the input"
        );
    } else {
        assert_eq!(chunked_out, stream, "passthrough changed the stream");
    }
});
