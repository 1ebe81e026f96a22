use super::packing::{PlannedShard, ShardSource, hash_shard, inventory, plan};
use super::*;
use crate::store::PutSource;

fn manifest() -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT.into(),
        run: "r".into(),
        step: 1,
        window: Some(0),
        parent: None,
        chunk_bytes: 16,
        shards: vec![ShardEntry {
            file: "00000.safetensors".into(),
            size: 40,
            blake3: "x".into(),
            chunks: vec!["a".into(), "b".into(), "c".into()],
        }],
        tensors: vec![
            TensorEntry {
                name: "a".into(),
                dtype: "F32".into(),
                shape: vec![2],
                shard: 0,
                begin: 16,
                end: 24,
                blake3: "y".into(),
            },
            TensorEntry {
                name: "b".into(),
                dtype: "F16".into(),
                shape: vec![2, 2],
                shard: 0,
                begin: 24,
                end: 32,
                blake3: "z".into(),
            },
        ],
        files: vec![FileEntry {
            file: "config.json".into(),
            size: 2,
            blake3: "w".into(),
        }],
    }
}

#[test]
fn a_sound_manifest_validates() {
    manifest().validate().unwrap();
}

#[test]
fn hostile_manifests_are_refused() {
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("parent dir", Box::new(|m| m.files[0].file = "../x".into())),
        (
            "absolute",
            Box::new(|m| m.files[0].file = "/etc/passwd".into()),
        ),
        (
            "nested",
            Box::new(|m| m.shards[0].file = "a/b.safetensors".into()),
        ),
        ("hidden", Box::new(|m| m.files[0].file = ".bashrc".into())),
        ("backslash", Box::new(|m| m.files[0].file = "a\\b".into())),
        (
            "index clash",
            Box::new(|m| m.files[0].file = HF_INDEX.into()),
        ),
        (
            "duplicate",
            Box::new(|m| m.files[0].file = "00000.safetensors".into()),
        ),
        ("past shard", Box::new(|m| m.tensors[1].end = 48)),
        ("size vs shape", Box::new(|m| m.tensors[0].shape = vec![3])),
        ("overlap", Box::new(|m| m.tensors[1].begin = 20)),
        ("no shard", Box::new(|m| m.tensors[0].shard = 5)),
        ("dtype", Box::new(|m| m.tensors[0].dtype = "F33".into())),
        (
            "chunks",
            Box::new(|m| m.shards[0].chunks.pop().map(|_| ()).unwrap_or(())),
        ),
        ("format", Box::new(|m| m.format = "v0".into())),
        ("tensor twice", Box::new(|m| m.tensors[1].name = "a".into())),
        (
            "shape overflow",
            Box::new(|m| m.tensors[0].shape = vec![u64::MAX, 4]),
        ),
        (
            "too many tensors",
            Box::new(|m| {
                let t = m.tensors[0].clone();
                m.tensors = (0..=super::MAX_TENSORS)
                    .map(|i| TensorEntry {
                        name: format!("t{i}"),
                        ..t.clone()
                    })
                    .collect();
            }),
        ),
        (
            "long name",
            Box::new(|m| m.tensors[0].name = "x".repeat(super::MAX_TENSOR_NAME + 1)),
        ),
        (
            "too many dims",
            Box::new(|m| m.tensors[0].shape = vec![1; 9]),
        ),
    ];
    for (what, f) in cases {
        let mut m = manifest();
        f(&mut m);
        assert!(m.validate().is_err(), "{what} was accepted");
    }
    // The count is refused before anything is built from it (not by a later overlap check).
    let mut m = manifest();
    let t = m.tensors[0].clone();
    m.tensors = vec![t; super::MAX_TENSORS + 1];
    let e = m.validate().unwrap_err().to_string();
    assert!(e.contains("limits"), "{e}");
}

#[test]
fn tensor_parallel_rule() {
    use super::pull::tp_dim;
    assert_eq!(
        tp_dim("model.layers.0.self_attn.q_proj.weight", &[8, 4]),
        Some(0)
    );
    assert_eq!(
        tp_dim("model.layers.0.self_attn.o_proj.weight", &[8, 4]),
        Some(1)
    );
    assert_eq!(
        tp_dim("model.layers.0.mlp.down_proj.weight", &[8, 4]),
        Some(1)
    );
    assert_eq!(tp_dim("model.norm.weight", &[8]), None);
    assert_eq!(tp_dim("x", &[2, 2, 2]), None);
}

fn st(tensors: &[(&str, usize)]) -> Vec<u8> {
    let data: Vec<(String, Vec<u8>)> = tensors
        .iter()
        .map(|(n, len)| (n.to_string(), (0..*len * 4).map(|i| i as u8).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![b.len() / 4], b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn repacked_shards_are_valid_safetensors_with_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.safetensors"),
        st(&[("x", 100), ("y", 7)]),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.safetensors"), st(&[("z", 300)])).unwrap();
    std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
    let inv = inventory(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(inv.extras.len(), 1);
    let shards = plan(&inv, 500);
    assert_eq!(shards.len(), 2, "x+y fit 500 bytes, z does not");
    let quiet = |_: u64| {};
    let mut found = std::collections::BTreeMap::new();
    for s in &shards {
        let src = ShardSource {
            inv: &inv,
            shard: s,
            progress: &quiet,
        };
        let mut bytes = vec![0u8; src.len() as usize];
        src.read_at(0, &mut bytes).unwrap();
        let h = hash_shard(&src).unwrap();
        assert_eq!(h.blake3, blake3::hash(&bytes).to_hex().to_string());
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, v) in parsed.tensors() {
            found.insert(name, v.data().to_vec());
        }
        // Reads at any offset and length agree with the whole.
        let mut piece = vec![0u8; 13];
        src.read_at(40, &mut piece).unwrap();
        assert_eq!(piece, bytes[40..53]);
    }
    assert_eq!(found.len(), 3);
    assert_eq!(found["z"], (0..1200).map(|i| i as u8).collect::<Vec<_>>());
}

#[test]
fn momentum_buffers_get_shards_of_their_own_after_the_model() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.safetensors"),
        st(&[
            ("outer_momentum.x", 100),
            ("x", 100),
            ("outer_momentum.y", 100),
            ("y", 100),
        ]),
    )
    .unwrap();
    let inv = inventory(&[dir.path().to_path_buf()]).unwrap();
    let shards = plan(&inv, 1000);
    let names = |s: &PlannedShard| -> Vec<String> {
        s.tensors
            .iter()
            .map(|&(i, _, _)| inv.tensors[i].name.clone())
            .collect()
    };
    let files: Vec<&str> = shards.iter().map(|s| s.file.as_str()).collect();
    assert_eq!(files, ["00000.safetensors", "momentum-00000.safetensors"]);
    assert_eq!(names(&shards[0]), ["x", "y"]);
    assert_eq!(names(&shards[1]), ["outer_momentum.x", "outer_momentum.y"]);
    // Each kind packs on its own: 400-byte tensors in 500-byte shards.
    let shards = plan(&inv, 500);
    let files: Vec<&str> = shards.iter().map(|s| s.file.as_str()).collect();
    assert_eq!(
        files,
        [
            "00000.safetensors",
            "00001.safetensors",
            "momentum-00000.safetensors",
            "momentum-00001.safetensors"
        ]
    );
}

#[test]
fn hostile_sources_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    // Header length past the end of the file.
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    assert!(inventory(std::slice::from_ref(&p)).is_err());
    // A tensor whose offsets run past the file.
    let h = br#"{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(h);
    b.extend_from_slice(&[0; 8]);
    std::fs::write(&p, &b).unwrap();
    assert!(inventory(std::slice::from_ref(&p)).is_err());
    // The same tensor in two files.
    std::fs::write(dir.path().join("c.safetensors"), st(&[("x", 1)])).unwrap();
    std::fs::write(dir.path().join("d.safetensors"), st(&[("x", 1)])).unwrap();
    assert!(
        inventory(&[
            dir.path().join("c.safetensors"),
            dir.path().join("d.safetensors")
        ])
        .is_err()
    );
}
