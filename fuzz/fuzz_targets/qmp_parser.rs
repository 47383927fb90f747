//! The QMP monitor's pure half (`tandemd::qmp::request`): the input bytes framed into
//! top-level JSON values and each checked as a request.
//! Invariant: any input is requests or typed rejections, never a panic, never a buffered value
//! over the size or depth bound (the splitter asserts both); and the result does not depend on
//! how the input is cut into reads (the first byte picks the read size), since a client's
//! requests arrive split anywhere.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandemd::qmp::request::{requests, Splitter, MAX_REQUEST_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else { return };
    let at_once = requests(&mut Splitter::default(), input);
    let mut splitter = Splitter::default();
    let mut in_reads = Vec::new();
    for read in input.chunks(usize::from(cut).max(1)) {
        in_reads.extend(requests(&mut splitter, read));
    }
    assert_eq!(at_once, in_reads, "the requests depend on where reads are cut");
    for request in at_once.iter().flatten() {
        assert!(request.execute.len() <= MAX_REQUEST_BYTES);
    }
});
