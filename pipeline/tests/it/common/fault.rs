//! Seeded fault injection for tests: fail, delay or truncate chosen calls, so that every
//! failure path (a lost response, a slow store, a body cut short) is exercised on purpose.
//! Built on the library's public wrapping point (`shardrop::store::hooked`), as a user's
//! own store behaviour would be; not part of the library's API.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::Result;
use object_store::path::Path;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use shardrop::store::hooked::{Op, StoreHooks};

/// Which calls a rule applies to.
#[derive(Clone, Debug)]
pub enum Calls {
    /// The n-th matching calls, counted from 1.
    Nth(Vec<u64>),
    /// Every matching call.
    All,
    /// Each matching call with this probability (drawn from the seeded generator).
    Probability(f64),
}

/// What happens to a chosen call.
#[derive(Clone, Debug)]
pub enum FaultAction {
    /// The call fails without reaching the store.
    Fail,
    /// The call waits this long first.
    Delay(Duration),
    /// A GET body ends after this many bytes, without error, as a cut connection looks.
    Truncate(u64),
}

/// One rule: calls of `op` (any op if `None`) whose path contains `path_contains`.
#[derive(Clone, Debug)]
pub struct FaultRule {
    /// Only requests of this kind (all kinds when `None`).
    pub op: Option<Op>,
    /// Only objects whose path contains this.
    pub path_contains: Option<String>,
    /// Which of the matching calls the rule hits.
    pub calls: Calls,
    /// What happens to them.
    pub action: FaultAction,
}

#[derive(Debug)]
struct State {
    rng: ChaCha8Rng,
    seen: Vec<u64>,
    injected: u64,
}

/// The fault injector: rules plus a seeded generator, so a failing test replays exactly.
#[derive(Debug)]
pub struct Faults {
    rules: Vec<FaultRule>,
    state: Mutex<State>,
}

impl Faults {
    /// A store wrapper applying `rules`; `seed` makes random choices repeatable.
    pub fn new(seed: u64, rules: Vec<FaultRule>) -> Self {
        let n = rules.len();
        Faults {
            rules,
            state: Mutex::new(State {
                rng: ChaCha8Rng::seed_from_u64(seed),
                seen: vec![0; n],
                injected: 0,
            }),
        }
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.state.lock().map(|s| s.injected).unwrap_or(0)
    }

    /// The actions chosen for this call (counts advance once per call).
    fn choose(&self, op: Op, path: Option<&Path>) -> Vec<FaultAction> {
        let Ok(mut st) = self.state.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.op.is_some_and(|o| o != op) {
                continue;
            }
            if let Some(needle) = &rule.path_contains
                && !path.is_some_and(|p| p.as_ref().contains(needle.as_str()))
            {
                continue;
            }
            st.seen[i] += 1;
            let n = st.seen[i];
            let hit = match &rule.calls {
                Calls::Nth(list) => list.contains(&n),
                Calls::All => true,
                Calls::Probability(p) => st.rng.random_bool(p.clamp(0.0, 1.0)),
            };
            if hit {
                st.injected += 1;
                out.push(rule.action.clone());
            }
        }
        out
    }
}

#[async_trait]
impl StoreHooks for Faults {
    async fn before(&self, op: Op, path: Option<&Path>) -> Result<()> {
        // GET bodies are cut in `get_stream`; here only fail and delay apply.
        if op == Op::Get {
            return Ok(());
        }
        apply(self.choose(op, path)).await
    }

    fn get_stream(
        &self,
        path: &Path,
        stream: BoxStream<'static, Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        let actions = self.choose(Op::Get, Some(path));
        let cut = actions.iter().find_map(|a| match a {
            FaultAction::Truncate(n) => Some(*n),
            _ => None,
        });
        let pre = actions
            .into_iter()
            .filter(|a| !matches!(a, FaultAction::Truncate(_)))
            .collect::<Vec<_>>();
        let mut left = cut.unwrap_or(u64::MAX);
        let body = stream
            .map(move |chunk| {
                chunk.map(|mut c| {
                    if (c.len() as u64) > left {
                        c = c.slice(..left as usize);
                    }
                    left -= c.len() as u64;
                    c
                })
            })
            .take_while(|c| futures::future::ready(!matches!(c, Ok(c) if c.is_empty())));
        futures::stream::once(async move { apply(pre).await })
            .flat_map(move |r| match r {
                Ok(()) => futures::stream::empty().boxed(),
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .chain(body)
            .boxed()
    }
}

async fn apply(actions: Vec<FaultAction>) -> Result<()> {
    for a in actions {
        match a {
            FaultAction::Delay(d) => tokio::time::sleep(d).await,
            FaultAction::Fail => {
                return Err(object_store::Error::Generic {
                    store: "fault-injection",
                    source: "injected failure".into(),
                });
            }
            FaultAction::Truncate(_) => {}
        }
    }
    Ok(())
}
