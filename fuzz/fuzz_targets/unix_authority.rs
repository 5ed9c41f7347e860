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
    let whole_result = feed_all(&mut whole, input, input.len().max(1), &mut whole_out);
    let mut pieces = AuthorityFix::new(8192);
    let mut pieces_out = Vec::new();
    let pieces_result = feed_all(&mut pieces, input, step, &mut pieces_out);
    assert_eq!(whole_result, pieces_result);
    if whole_result {
        assert_eq!(whole_out, pieces_out);
    }
});

/// Feeds `input` in pieces of `step` bytes, each until taken (a feed may
/// take part of a piece); false on an error.
fn feed_all(fix: &mut AuthorityFix, input: &[u8], step: usize, out: &mut Vec<u8>) -> bool {
    for mut piece in input.chunks(step) {
        while !piece.is_empty() {
            let before = out.len();
            match fix.feed(piece, out) {
                Ok(taken) => {
                    // Progress: input taken, or output made.
                    assert!(taken > 0 || out.len() > before);
                    piece = &piece[taken..];
                }
                Err(_) => return false,
            }
        }
    }
    true
}
