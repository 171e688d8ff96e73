//! A hostile guest next to a well-behaved one on the same proxy, over a
//! real RabbitMQ and the real Python oslo.messaging: each attack is one
//! test, and each asserts that the proxy stays up, that the good guest's
//! traffic keeps flowing with nothing lost, and that the attack shows in the
//! counters. The hostile guest is played by the test (`FakeGuest`,
//! `RawGuest`, `FloodGuest` in `tests/support/guest.rs`).
//!
//! - `scene`: the proxy, the broker, the good and the hostile guest, and
//!   the bound on the proxy's memory every test checks;
//! - `broker`: attacks on the broker bridge (poison messages, shares of
//!   calls and bytes, topic churn, fanouts, cast floods);
//! - `link`: attacks on the link (no acknowledgements, resend and garbage
//!   floods, impossible headers, log floods, slowloris).

#[path = "../support/mod.rs"]
mod support;

mod broker;
mod link;
mod scene;
