//! The Unix-socket `:authority` rewriter (`service::authority`): whatever a
//! local peer sends, fed in pieces of any size. It never panics, and the
//! pieces do not matter: the same bytes fed whole give the same output and
//! the same verdict.
#![no_main]

use box_token_broker::service::authority::AuthorityFix;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut whole = AuthorityFix::new(8192);
    let mut whole_out = Vec::new();
    let whole_result = whole.feed(input, &mut whole_out);
    let mut pieces = AuthorityFix::new(8192);
    let mut pieces_out = Vec::new();
    let mut pieces_result = Ok(());
    for piece in input.chunks(step) {
        pieces_result = pieces.feed(piece, &mut pieces_out);
        if pieces_result.is_err() {
            break;
        }
    }
    assert_eq!(whole_result.is_ok(), pieces_result.is_ok());
    if whole_result.is_ok() {
        assert_eq!(whole_out, pieces_out);
    }
});
