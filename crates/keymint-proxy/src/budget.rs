//! Budgets and rate limits per task.
//!
//! Budgets (requests, input and output tokens, spend) are kept in the store
//! (`Store::reserve_budget`, docs/design/0015-durable-budgets.md): a
//! request first *reserves* what it may use at most (one request, the
//! input tokens estimated from the body, the output tokens it may
//! generate, their cost) against its task *and every ancestor task*, in one
//! store transaction, so that concurrent requests, other processes, restarts
//! and sub-tasks cannot together pass a limit; after the response it
//! *settles* the reservation against the usage the provider reported (or,
//! if none was reported, keeps the whole reservation: an unknown cost is
//! never counted as free). [`fit`] is the arithmetic the store runs inside
//! its transaction.
//!
//! Rate limits (requests and tokens per minute) are token buckets in the
//! store too, spent from memory in slices ([`crate::rates`]).

use keymint_store::BudgetLevel;
pub use keymint_store::Usage;

use crate::config::{Policy, Price};
use crate::rates::Took;

/// What one request asks for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// Upper bound of the input tokens (estimated from the body).
    pub input: u64,
    /// Output tokens the request may generate: its limit times
    /// `choices`.
    pub output: u64,
    /// How many choices share the output (OpenAI's `n`; at least 1): an
    /// output lowered to what a budget has left stays a multiple of it,
    /// so that each choice's limit times `choices` fits.
    pub choices: u64,
    pub price: Option<Price>,
    /// Whether tokens are metered at all (model listings are not).
    pub metered: bool,
}

/// A granted reservation, held in the store (`id`). `output` may be lower
/// than asked: the request's output limit must then be lowered to it.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub id: String,
    pub task: String,
    pub input: u64,
    pub output: u64,
    pub spend: u64,
    pub price: Option<Price>,
    /// Drawn from a chunk (`id` is the chunk's) held for this lease, and
    /// settled through it: `None` for a reservation of its own.
    pub chunk: Option<String>,
    /// The task's rate limits the request was taken under, and when: what
    /// it did not use goes back to them.
    pub rates: Took,
}

impl Reservation {
    /// What the reservation holds, as a request's share of a budget.
    pub fn share(&self) -> Usage {
        Usage {
            requests: 1,
            input: self.input,
            output: self.output,
            spend_nusd: self.spend,
        }
    }

    /// What settling charges: the use reported (`(input, output)`, priced)
    /// or, when none was, the whole reservation.
    pub fn charge(&self, actual: Option<(u64, u64)>) -> Usage {
        let (input, output) = actual.unwrap_or((self.input, self.output));
        let spend_nusd = match (actual, self.price) {
            (Some(_), Some(p)) => p.cost(input, output),
            _ => self.spend,
        };
        Usage {
            requests: 1,
            input,
            output,
            spend_nusd,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A per-task budget (the task's or an ancestor's) is used up.
    Budget(&'static str),
    /// A rate limit: try again after this many seconds.
    Rate(&'static str, u64),
    /// The role has a spend budget and the model has no price.
    UnknownCost,
    /// The store could not be asked: fail closed.
    Unavailable,
}

/// [`fit`]'s refusal for a request that needs more input tokens than a
/// budget on its chain allows in all: it could not fit a fresh task either
/// (a budget of what is left says "used up", 429; this one is the
/// request's fault, 400: a smaller request may fit).
pub const MORE_INPUT_THAN_ALLOWED: &str = "input tokens of this request";
/// The same for the cost of the request's input against a spend budget.
pub const MORE_SPEND_THAN_ALLOWED: &str = "spend of this request";

/// What a refusal lacks, when it is one of a request larger than a budget
/// allows in all ([`MORE_INPUT_THAN_ALLOWED`], [`MORE_SPEND_THAN_ALLOWED`])
/// rather than of a budget used up.
pub fn more_than_allowed(what: &str) -> Option<&'static str> {
    match what {
        MORE_INPUT_THAN_ALLOWED => Some("input tokens"),
        MORE_SPEND_THAN_ALLOWED => Some("spend"),
        _ => None,
    }
}

fn room(limit: Option<u64>, used: u64, reserved: u64) -> u64 {
    limit.map_or(u64::MAX, |l| {
        l.saturating_sub(used.saturating_add(reserved))
    })
}

/// The reservation for `ask`, given the budgets on the way from the task
/// to its root (`levels`; `policy_of` names each level role's limits, and a
/// role without a proxy policy limits nothing). Every level must have room:
/// a request, its input tokens and some output; the output is lowered to
/// what the tightest level has left (tokens and spend). Runs inside the
/// store's transaction.
pub fn fit<'p>(
    levels: &[BudgetLevel],
    policy_of: impl Fn(&str) -> Option<&'p Policy>,
    ask: Ask,
) -> Result<Usage, &'static str> {
    let limits: Vec<(&BudgetLevel, &Policy)> = levels
        .iter()
        .filter_map(|l| Some((l, policy_of(&l.role)?)))
        .collect();
    let min_room = |f: &dyn Fn(&Policy, &BudgetLevel) -> u64| {
        limits
            .iter()
            .map(|(l, p)| f(p, l))
            .min()
            .unwrap_or(u64::MAX)
    };
    if min_room(&|p, l| room(p.max_requests, l.used.requests, l.reserved.requests)) == 0 {
        return Err("requests");
    }
    if !ask.metered {
        return Ok(Usage {
            requests: 1,
            ..Usage::default()
        });
    }
    let input = ask.input;
    if input > min_room(&|p, l| room(p.max_input_tokens, l.used.input, l.reserved.input)) {
        return Err(
            if input > min_room(&|p, _| p.max_input_tokens.unwrap_or(u64::MAX)) {
                MORE_INPUT_THAN_ALLOWED
            } else {
                "input tokens"
            },
        );
    }
    // Lowered to a whole number of tokens per choice.
    let per_choice = |o: u64| o - o % ask.choices.max(1);
    let mut output = per_choice(ask.output.min(min_room(&|p, l| {
        room(p.max_output_tokens, l.used.output, l.reserved.output)
    })));
    if ask.output > 0 && output == 0 {
        return Err("output tokens");
    }
    let spend_limited = limits.iter().any(|(_, p)| p.max_spend_nusd().is_some());
    if spend_limited {
        // An unknown cost cannot be held against a spend budget.
        let Some(price) = ask.price else {
            return Err("spend");
        };
        let left =
            min_room(&|p, l| room(p.max_spend_nusd(), l.used.spend_nusd, l.reserved.spend_nusd));
        let in_cost = price.cost(input, 0);
        if in_cost >= left && (in_cost > 0 || left == 0) {
            let allowed = min_room(&|p, _| p.max_spend_nusd().unwrap_or(u64::MAX));
            return Err(if in_cost >= allowed && in_cost > 0 {
                MORE_SPEND_THAN_ALLOWED
            } else {
                "spend"
            });
        }
        if let Some(affordable) = (left - in_cost).checked_div(price.output_nusd) {
            output = per_choice(output.min(affordable));
        }
        if ask.output > 0 && output == 0 {
            return Err("spend");
        }
    }
    Ok(Usage {
        requests: 1,
        input,
        output,
        spend_nusd: ask.price.map_or(0, |p| p.cost(input, output)),
    })
}

/// A chunk is at most this fraction (1/N) of what is left of the tightest
/// budget on the chain when it is reserved.
pub const CHUNK_FRACTION: u64 = 8;
/// The most requests a lease's first chunk holds, and the least a busy
/// lease's chunks may be asked to hold.
pub const CHUNK_START: u64 = 256;
/// The most requests one chunk holds: a lease whose chunks go fast is given
/// larger ones, doubling up to this (design 0030, "Chunks sized by demand").
pub const MAX_CHUNK: u64 = 4096;

/// A request's share of a chunk: what [`fit`] would reserve for `ask` when
/// every level has room (`None`: such a request is never served from a
/// chunk; a metered request without a price must be decided by the store,
/// where an unknown cost against a spend budget fails closed).
pub fn share(ask: Ask) -> Option<Usage> {
    if !ask.metered {
        return Some(Usage {
            requests: 1,
            ..Usage::default()
        });
    }
    let price = ask.price?;
    Some(Usage {
        requests: 1,
        input: ask.input,
        output: ask.output,
        spend_nusd: price.cost(ask.input, ask.output),
    })
}

/// A chunk for requests like `ask`: [`fit`]'s reservation for one of them,
/// times `n`, where `n` is at most `most` (and [`MAX_CHUNK`]), at most `1/`[`CHUNK_FRACTION`]
/// of the requests like it that the tightest level has room for, and at
/// least 1. A request whose output must be lowered gets exactly its own
/// reservation (`n` = 1): the end of a budget is decided request by request,
/// as without chunks.
pub fn fit_chunk<'p>(
    levels: &[BudgetLevel],
    policy_of: impl Fn(&str) -> Option<&'p Policy>,
    ask: Ask,
    most: u64,
) -> Result<Usage, &'static str> {
    let one = fit(levels, &policy_of, ask)?;
    if share(ask) != Some(one) {
        return Ok(one);
    }
    let most = most.clamp(1, MAX_CHUNK);
    let mut units = most.saturating_mul(CHUNK_FRACTION);
    for l in levels {
        let Some(p) = policy_of(&l.role) else {
            continue;
        };
        for (limit, used, reserved, each) in [
            (p.max_requests, l.used.requests, l.reserved.requests, 1),
            (
                p.max_input_tokens,
                l.used.input,
                l.reserved.input,
                one.input,
            ),
            (
                p.max_output_tokens,
                l.used.output,
                l.reserved.output,
                one.output,
            ),
            (
                p.max_spend_nusd(),
                l.used.spend_nusd,
                l.reserved.spend_nusd,
                one.spend_nusd,
            ),
        ] {
            if limit.is_some() && each > 0 {
                units = units.min(room(limit, used, reserved) / each);
            }
        }
    }
    let n = (units / CHUNK_FRACTION).clamp(1, most);
    Ok(Usage {
        requests: n,
        input: one.input.saturating_mul(n),
        output: one.output.saturating_mul(n),
        spend_nusd: one.spend_nusd.saturating_mul(n),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const PRICE: Price = Price {
        input_nusd: 1000,
        output_nusd: 2000,
    };

    fn ask(input: u64, output: u64) -> Ask {
        Ask {
            input,
            output,
            choices: 1,
            price: Some(PRICE),
            metered: true,
        }
    }

    fn level(role: &str, used: Usage, reserved: Usage) -> BudgetLevel {
        BudgetLevel {
            task: format!("tsk_{role}"),
            role: role.into(),
            used,
            reserved,
        }
    }

    fn out(n: u64) -> Usage {
        Usage {
            output: n,
            ..Usage::default()
        }
    }

    #[test]
    fn the_output_is_lowered_to_the_tightest_level_and_nothing_passes_a_budget() {
        let small = Policy {
            max_output_tokens: Some(100),
            max_requests: Some(3),
            ..Policy::default()
        };
        let roles: HashMap<&str, Policy> = [("small", small)].into();
        let of = |r: &str| roles.get(r);
        // 60 of 100 are held: only 40 are left.
        let l = [level("small", Usage::default(), out(60))];
        assert_eq!(fit(&l, of, ask(10, 60)).unwrap().output, 40);
        // A level without a policy limits nothing; the ancestor still does.
        let l = [
            level("unlimited", Usage::default(), Usage::default()),
            level("small", out(30), out(60)),
        ];
        assert_eq!(fit(&l, of, ask(10, 60)).unwrap().output, 10);
        let l = [level("small", out(40), out(60))];
        assert_eq!(fit(&l, of, ask(10, 60)), Err("output tokens"));
        let three = Usage {
            requests: 3,
            ..Usage::default()
        };
        let l = [
            level("unlimited", Usage::default(), Usage::default()),
            level("small", three, Usage::default()),
        ];
        assert_eq!(fit(&l, of, ask(1, 1)), Err("requests"));
        // Unmetered requests count as requests only.
        let mut listing = ask(500, 0);
        listing.metered = false;
        let l = [level("small", Usage::default(), Usage::default())];
        assert_eq!(
            fit(&l, of, listing).unwrap(),
            Usage {
                requests: 1,
                ..Usage::default()
            }
        );
    }

    /// A chat completion's `n` choices share the output reserved: lowered,
    /// it stays a whole number of tokens per choice, and a remainder
    /// smaller than one token per choice is a budget used up.
    #[test]
    fn a_lowered_output_is_a_whole_number_of_tokens_per_choice() {
        let p = Policy {
            max_output_tokens: Some(10),
            max_spend_usd: Some(0.0001),
            ..Policy::default()
        };
        let of = |_: &str| Some(&p);
        let four = Ask {
            choices: 4,
            ..ask(10, 20)
        };
        let l = [level("r", Usage::default(), Usage::default())];
        assert_eq!(fit(&l, of, four).unwrap().output, 8);
        let l = [level("r", out(7), Usage::default())];
        assert_eq!(fit(&l, of, four), Err("output tokens"));
        // Spend: 100,000 nUSD less 10,000 of input leaves 45 output
        // tokens: 44, for 4 choices of 11.
        let p = Policy {
            max_spend_usd: Some(0.0001),
            ..Policy::default()
        };
        let of = |_: &str| Some(&p);
        let l = [level("r", Usage::default(), Usage::default())];
        let wide = Ask {
            choices: 4,
            ..ask(10, 400)
        };
        assert_eq!(fit(&l, of, wide).unwrap().output, 44);
    }

    #[test]
    fn spend_is_reserved_from_the_price_and_unknown_cost_fails_closed() {
        // 0.0001 USD = 100,000 nUSD: 10 input (10,000) + at most 45 output.
        let p = Policy {
            max_spend_usd: Some(0.0001),
            ..Policy::default()
        };
        let of = |_: &str| Some(&p);
        let l = [level("r", Usage::default(), Usage::default())];
        let r = fit(&l, of, ask(10, 1000)).unwrap();
        assert_eq!((r.output, r.spend_nusd), (45, 100_000));
        let spent = Usage {
            spend_nusd: 100_000,
            ..Usage::default()
        };
        let l = [level("r", Usage::default(), spent)];
        assert_eq!(fit(&l, of, ask(10, 10)), Err("spend"));
        // A request whose input alone costs more than the whole budget
        // could never fit: the refusal says so (a smaller request may
        // fit), not "used up". One that would fit a fresh budget but not
        // what is left of this one: used up, as before.
        let l = [level("r", Usage::default(), Usage::default())];
        assert_eq!(fit(&l, of, ask(100, 10)), Err(MORE_SPEND_THAN_ALLOWED));
        let most = Usage {
            spend_nusd: 95_000,
            ..Usage::default()
        };
        let l = [level("r", most, Usage::default())];
        assert_eq!(fit(&l, of, ask(10, 10)), Err("spend"));
        assert_eq!(more_than_allowed(MORE_SPEND_THAN_ALLOWED), Some("spend"));
        assert_eq!(more_than_allowed("spend"), None);
        let t = Policy {
            max_input_tokens: Some(50),
            ..Policy::default()
        };
        let of_t = |_: &str| Some(&t);
        let l = [level("r", Usage::default(), Usage::default())];
        assert_eq!(fit(&l, of_t, ask(51, 1)), Err(MORE_INPUT_THAN_ALLOWED));
        assert!(fit(&l, of_t, ask(50, 1)).is_ok());
        let used = Usage {
            input: 40,
            ..Usage::default()
        };
        let l = [level("r", used, Usage::default())];
        assert_eq!(fit(&l, of_t, ask(11, 1)), Err("input tokens"));
        let mut unpriced = ask(1, 1);
        unpriced.price = None;
        let l = [level("r", Usage::default(), Usage::default())];
        assert_eq!(fit(&l, of, unpriced), Err("spend"));
    }

    #[test]
    fn a_chunk_is_a_fraction_of_what_is_left_and_exact_at_the_end() {
        let p = Policy {
            max_requests: Some(100),
            max_output_tokens: Some(10_000),
            ..Policy::default()
        };
        let roles: HashMap<&str, Policy> = [
            ("r", p),
            (
                "five",
                Policy {
                    max_requests: Some(5),
                    ..Policy::default()
                },
            ),
        ]
        .into();
        let of = |r: &str| roles.get(r);
        let fresh = |role: &str| level(role, Usage::default(), Usage::default());
        // 100 requests, 10,000 output tokens at 50 each (200 requests):
        // requests are tighter, 100 / 8 = 12.
        let c = fit_chunk(&[fresh("r")], of, ask(10, 50), CHUNK_START).unwrap();
        assert_eq!(
            c,
            Usage {
                requests: 12,
                input: 120,
                output: 600,
                spend_nusd: 12 * PRICE.cost(10, 50)
            }
        );
        // An ancestor with 5 requests: exactly one request's reservation.
        let c = fit_chunk(&[fresh("r"), fresh("five")], of, ask(10, 50), CHUNK_START).unwrap();
        assert_eq!(c, fit(&[fresh("five")], of, ask(10, 50)).unwrap());
        // Output tokens tighter: 1,000 left at 50 each is 20, 20 / 8 = 2.
        let l = [level(
            "r",
            Usage {
                output: 8_000,
                ..Usage::default()
            },
            out(1_000),
        )];
        assert_eq!(
            fit_chunk(&l, of, ask(10, 50), CHUNK_START)
                .unwrap()
                .requests,
            2
        );
        // Fewer than 16 left: one request at a time; lowered output: one.
        let l = [level("r", Usage::default(), out(9_500))];
        assert_eq!(
            fit_chunk(&l, of, ask(10, 50), CHUNK_START)
                .unwrap()
                .requests,
            1
        );
        let l = [level("r", Usage::default(), out(9_990))];
        let c = fit_chunk(&l, of, ask(10, 50), CHUNK_START).unwrap();
        assert_eq!((c.requests, c.output), (1, 10));
        // No limit at all: the size asked for, never above the largest.
        // Nothing left: refused.
        let c = fit_chunk(&[fresh("none")], of, ask(10, 50), CHUNK_START).unwrap();
        assert_eq!(c.requests, CHUNK_START);
        let c = fit_chunk(&[fresh("none")], of, ask(10, 50), u64::MAX).unwrap();
        assert_eq!(c.requests, MAX_CHUNK);
        // A larger size asked for still takes at most an eighth of what is
        // left: 100 requests, 12.
        assert_eq!(
            fit_chunk(&[fresh("r")], of, ask(10, 50), MAX_CHUNK)
                .unwrap()
                .requests,
            12
        );
        let l = [level(
            "five",
            Usage {
                requests: 5,
                ..Usage::default()
            },
            Usage::default(),
        )];
        assert_eq!(fit_chunk(&l, of, ask(1, 1), CHUNK_START), Err("requests"));
        // A request without a price is never served from a chunk.
        let mut unpriced = ask(1, 1);
        unpriced.price = None;
        assert_eq!(share(unpriced), None);
    }

    #[test]
    fn a_settle_charges_what_was_reported_or_everything() {
        let r = Reservation {
            id: "rsv_x".into(),
            task: "tsk_x".into(),
            input: 10,
            output: 60,
            spend: 130_000,
            price: Some(PRICE),
            chunk: None,
            rates: Took::default(),
        };
        assert_eq!(
            r.charge(Some((5, 20))),
            Usage {
                requests: 1,
                input: 5,
                output: 20,
                spend_nusd: 45_000
            }
        );
        assert_eq!(r.charge(None).spend_nusd, 130_000);
        assert_eq!(r.charge(None).output, 60);
    }
}
