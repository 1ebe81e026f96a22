#![allow(clippy::needless_range_loop)] // element i of several parallel arrays
use super::*;
use rand::{Rng, SeedableRng};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn setting(optimizer: OptimizerKind, lr: f32, momentum: f32) -> Setting {
    Setting {
        from_window: 0,
        outer: Outer {
            optimizer,
            lr,
            momentum,
            schedule: Schedule::default(),
        },
        beta: 0.9,
    }
}

/// The same rule in f64, with a running bound on how far the f32 result may be from it:
/// each f32 operation rounds to within `U·|result|`, and earlier errors propagate through
/// the linear recurrences exactly as written below.
struct Reference {
    theta: Vec<f64>,
    m: Vec<f64>,
    e_theta: Vec<f64>,
    e_m: Vec<f64>,
}

impl Reference {
    fn new(theta: &[f32]) -> Self {
        let n = theta.len();
        Reference {
            theta: theta.iter().map(|&x| x as f64).collect(),
            m: vec![0.0; n],
            e_theta: vec![0.0; n],
            e_m: vec![0.0; n],
        }
    }

    fn step(&mut self, kind: OptimizerKind, lr: f32, mu: f32, a: &[f32]) {
        let (lr, mu) = (lr as f64, mu as f64);
        for i in 0..a.len() {
            let x = a[i] as f64;
            let g = match kind {
                OptimizerKind::Sgd => {
                    if x == 0.0 {
                        continue;
                    }
                    x
                }
                OptimizerKind::Momentum | OptimizerKind::Nesterov => {
                    let m = mu * self.m[i] + x;
                    self.e_m[i] = mu * self.e_m[i] + U * ((mu * self.m[i]).abs() + m.abs()) * 1.01;
                    self.m[i] = m;
                    if kind == OptimizerKind::Momentum {
                        m
                    } else {
                        x + mu * m
                    }
                }
            };
            let e_g = match kind {
                OptimizerKind::Sgd => 0.0,
                OptimizerKind::Momentum => self.e_m[i],
                OptimizerKind::Nesterov => {
                    mu * self.e_m[i] + U * ((mu * self.m[i]).abs() + g.abs()) * 1.01
                }
            };
            let t = self.theta[i] - lr * g;
            self.e_theta[i] += lr * e_g + U * ((lr * g).abs() + t.abs()) * 1.01;
            self.theta[i] = t;
        }
    }
}

#[test]
fn every_optimizer_stays_within_its_rounding_of_an_f64_reference() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let n = 5000;
    for kind in [
        OptimizerKind::Sgd,
        OptimizerKind::Momentum,
        OptimizerKind::Nesterov,
    ] {
        let (lr, mu) = match kind {
            OptimizerKind::Sgd => (0.4, 0.0),
            _ => (0.7, 0.9),
        };
        let s = setting(kind, lr, mu);
        let mut theta: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut m = vec![0f32; n];
        let mut reference = Reference::new(&theta);
        for _ in 0..40 {
            // Sparse, like a merged top-k aggregate: most entries exactly zero.
            let a: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..8) {
                    0 => rng.random_range(-0.05..0.05),
                    _ => 0.0,
                })
                .collect();
            step(&s.outer, s.lr_at(0), &mut theta, &a, &mut m);
            reference.step(kind, s.lr_at(0), mu, &a);
        }
        let mut moved = 0;
        for i in 0..n {
            let err = (theta[i] as f64 - reference.theta[i]).abs();
            assert!(
                err <= reference.e_theta[i] + 1e-30,
                "{kind:?} element {i}: f32 {} vs f64 {} (error {err:e} > bound {:e})",
                theta[i],
                reference.theta[i],
                reference.e_theta[i]
            );
            moved += usize::from(reference.e_theta[i] > 0.0);
        }
        assert!(moved > n / 2, "{kind:?}: the test moved too few elements");
    }
}

#[test]
fn nesterov_is_not_heavy_ball_and_sgd_keeps_no_state() {
    let a = vec![1.0f32; 4];
    let mut m = vec![0f32; 4];
    let (mut t1, mut t2) = (vec![0f32; 4], vec![0f32; 4]);
    let n = setting(OptimizerKind::Nesterov, 1.0, 0.5);
    let h = setting(OptimizerKind::Momentum, 1.0, 0.5);
    step(&n.outer, 1.0, &mut t1, &a, &mut m);
    // m = 1; nesterov steps by a + μ·m = 1.5, heavy ball by m = 1.
    assert_eq!(t1, vec![-1.5; 4]);
    let mut m2 = vec![0f32; 4];
    step(&h.outer, 1.0, &mut t2, &a, &mut m2);
    assert_eq!(t2, vec![-1.0; 4]);
    let mut m3 = vec![7f32; 4];
    let mut t3 = vec![0f32; 4];
    step(
        &setting(OptimizerKind::Sgd, 0.5, 0.0).outer,
        0.5,
        &mut t3,
        &a,
        &mut m3,
    );
    assert_eq!((t3, m3), (vec![-0.5; 4], vec![7.0; 4]));
}

#[test]
fn the_parallel_split_changes_no_bit() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let n = 3 * PAR + 17;
    let s = setting(OptimizerKind::Nesterov, 0.7, 0.9);
    let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let theta0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let m0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (mut t, mut m) = (theta0.clone(), m0.clone());
    step(&s.outer, 0.7, &mut t, &a, &mut m);
    for i in 0..n {
        let mm = 0.9f32 * m0[i] + a[i];
        let tt = theta0[i] - 0.7f32 * (a[i] + 0.9f32 * mm);
        assert_eq!(
            (t[i].to_bits(), m[i].to_bits()),
            (tt.to_bits(), mm.to_bits())
        );
    }
}

#[test]
fn schedules_follow_their_closed_forms() {
    let mut s = setting(OptimizerKind::Nesterov, 0.8, 0.9);
    s.from_window = 10;
    s.outer.schedule = Schedule {
        kind: ScheduleKind::Cosine,
        warmup: 4,
        decay: 100,
        final_ratio: 0.25,
        origin: None,
    };
    assert_eq!(s.problem(), None);
    // Warm-up counts from the setting's first window.
    assert_eq!(s.lr_at(10), (f64::from(0.8f32) * 0.25) as f32);
    assert_eq!(s.lr_at(13), 0.8);
    // Half way through the decay: (1 + r) / 2 of the base.
    assert_eq!(s.lr_at(14 + 50), (f64::from(0.8f32) * 0.625) as f32);
    assert_eq!(s.lr_at(14 + 100), (f64::from(0.8f32) * 0.25) as f32);
    assert_eq!(s.lr_at(14 + 1000), (f64::from(0.8f32) * 0.25) as f32);
    s.outer.schedule.kind = ScheduleKind::Linear;
    assert_eq!(
        s.lr_at(14 + 25),
        (f64::from(0.8f32) * (0.25 + 0.75 * 0.75)) as f32
    );
    // An earlier origin continues a schedule that began before the setting.
    s.outer.schedule.origin = Some(0);
    assert_eq!(
        s.lr_at(10),
        (f64::from(0.8f32) * (0.25 + 0.75 * (1.0 - 6.0 / 100.0))) as f32
    );
    s.outer.schedule.origin = Some(11);
    assert!(s.problem().is_some());
}

#[test]
fn bad_settings_are_named() {
    let mut s = setting(OptimizerKind::Sgd, 1.0, 0.5);
    assert!(s.problem().unwrap().contains("sgd takes no momentum"));
    s.outer.momentum = 0.0;
    s.outer.lr = f32::NAN;
    assert!(s.problem().unwrap().contains("learning rate"));
    s.outer.lr = 1.0;
    s.outer.schedule.kind = ScheduleKind::Cosine;
    assert!(s.problem().unwrap().contains("decay > 0"));
    let mut n = setting(OptimizerKind::Nesterov, 1.0, 1.0);
    assert!(n.problem().unwrap().contains("momentum"));
    n.outer.momentum = 0.9;
    n.beta = 2.0;
    assert!(n.problem().unwrap().contains("beta"));
}

#[test]
fn momentum_tensors_round_trip_through_prefixed_names() {
    let mut dense = crate::format::codec::Dense::new();
    dense.insert("w".into(), (vec![2], vec![1.0, 2.0]));
    dense.insert(format!("{MOMENTUM_PREFIX}w"), (vec![2], vec![0.5, -0.5]));
    let state = OuterState::take_from(&mut dense);
    assert_eq!(dense.keys().collect::<Vec<_>>(), ["w"]);
    assert_eq!(state.momentum["w"], vec![0.5, -0.5]);
    let shapes = [("w".to_string(), vec![2u64])].into();
    let back = state.to_dense(&shapes);
    assert_eq!(
        back[&format!("{MOMENTUM_PREFIX}w")],
        (vec![2], vec![0.5, -0.5])
    );
}

#[test]
fn state_files_have_one_byte_form() {
    // The metadata has three keys; safetensors writes its map in a per-process random order.
    // Every save of the same state must give the same bytes, with the keys in byte order.
    let mut state = OuterState::default();
    state.momentum.insert("b".into(), vec![0.5, -1.0]);
    state.momentum.insert("a".into(), vec![2.0; 3]);
    let shapes: BTreeMap<String, Vec<u64>> =
        [("a".to_string(), vec![3]), ("b".to_string(), vec![1, 2])].into();
    let first = state_to_safetensors(&state, &shapes, "run-1", Some(7)).unwrap();
    for _ in 0..32 {
        assert_eq!(
            state_to_safetensors(&state, &shapes, "run-1", Some(7)).unwrap(),
            first
        );
    }
    let text = String::from_utf8_lossy(&first[8..]).to_string();
    let (a, f, r) = (
        text.find("\"after\"").unwrap(),
        text.find("\"format\"").unwrap(),
        text.find("\"run\"").unwrap(),
    );
    assert!(a < f && f < r, "metadata keys not in byte order: {text}");
    let (back, run, after) = state_from_safetensors(&first).unwrap();
    assert_eq!((back, run.as_str(), after), (state, "run-1", Some(7)));
}

#[test]
fn the_stated_cosine_is_the_cosine_and_moves_no_rate() {
    // The polynomial against libm's cos (what earlier builds used) on a fine grid of [0, 1].
    let mut worst = 0f64;
    for i in 0..=100_000u32 {
        let s = f64::from(i) / 100_000.0;
        let d = (cos_pi(s) - libm::cos(std::f64::consts::PI * s)).abs();
        worst = worst.max(d);
    }
    assert!(worst <= 4.5e-16, "worst difference {worst:e}");
    assert_eq!(cos_pi(0.0), 1.0);
    assert_eq!(cos_pi(1.0), -1.0);
    // And the f32 rates a run sees: every window of cosine schedules up to 300 windows of
    // decay, at several base rates and final ratios, equal to the libm formula's.
    let mut differ = 0;
    let mut total = 0;
    for &lr in &[1.0f32, 0.7, 0.35, 1e-3, 0.123_456_79] {
        for &r in &[0.0f32, 0.1, 0.5] {
            for decay in 1..=300u64 {
                let mut st = setting(OptimizerKind::Sgd, lr, 0.0);
                st.outer.schedule = Schedule {
                    kind: ScheduleKind::Cosine,
                    warmup: 0,
                    decay,
                    final_ratio: r,
                    origin: None,
                };
                for w in 0..=decay {
                    let done = w as f64 / decay as f64;
                    let r = f64::from(r);
                    let old = (f64::from(lr)
                        * (r + (1.0 - r) * 0.5 * (1.0 + libm::cos(std::f64::consts::PI * done))))
                        as f32;
                    total += 1;
                    differ += usize::from(st.lr_at(w).to_bits() != old.to_bits());
                }
            }
        }
    }
    assert!(total > 600_000);
    // A handful of f64 last-bit differences may cross an f32 rounding boundary; none did
    // on this grid when the polynomial was chosen.
    assert_eq!(differ, 0, "{differ} of {total} rates moved");
}

#[test]
fn a_setting_change_keeps_what_it_does_not_name() {
    let sgd = setting(OptimizerKind::Sgd, 0.7, 0.0);
    let nesterov = setting(OptimizerKind::Nesterov, 0.7, 0.5);
    let to = |k| SettingChange {
        optimizer: Some(k),
        ..SettingChange::default()
    };
    // (base, change, momentum after): a rule that keeps momentum starts at 0.9 unless the
    // old rule kept one; a rule without momentum has 0.
    let cases = [
        (&sgd, to(OptimizerKind::Nesterov), 0.9),
        (&nesterov, to(OptimizerKind::Momentum), 0.5),
        (&nesterov, to(OptimizerKind::Sgd), 0.0),
        (
            &sgd,
            SettingChange {
                optimizer: Some(OptimizerKind::Momentum),
                momentum: Some(0.25),
                ..SettingChange::default()
            },
            0.25,
        ),
    ];
    for (base, change, momentum) in cases {
        let after = change.over(base, 5);
        assert_eq!(after.outer.momentum, momentum, "{change:?}");
        assert_eq!(
            (after.from_window, after.outer.lr, after.beta),
            (5, 0.7, 0.9)
        );
    }
    // A schedule in progress carries its origin over an lr change, and starts afresh when
    // its shape changes.
    let mut warm = setting(OptimizerKind::Sgd, 1.0, 0.0);
    warm.outer.schedule.warmup = 10;
    let lr_only = SettingChange {
        lr: Some(0.5),
        ..SettingChange::default()
    };
    assert_eq!(lr_only.over(&warm, 4).outer.schedule.origin, Some(0));
    let reshaped = SettingChange {
        warmup: Some(3),
        ..SettingChange::default()
    };
    assert_eq!(reshaped.over(&warm, 4).outer.schedule.origin, None);
    // A constant rate without warm-up has nothing to carry.
    assert_eq!(lr_only.over(&sgd, 4).outer.schedule.origin, None);
}
