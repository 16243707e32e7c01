use super::*;

#[test]
fn permuting_rows_for_llama_cpp_is_the_inverse_of_the_loaders_unpermute() {
    let (rows, cols, heads) = (24, 3, 3);
    let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let p = permute_rows(&v, rows, heads).unwrap();
    assert_ne!(p, v);
    let t = Tensor::from_vec(p, (rows, cols), &Device::Cpu).unwrap();
    let back = crate::model::io::unpermute_rows(&t, heads).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(back, v);
    // Within a head of 8 rows, Hugging Face's halves [0..4) and [4..8) interleave: 0,4,1,5,...
    assert_eq!(&permute_rows(&v, rows, heads).unwrap()[..8 * cols].chunks(cols).map(|r| r[0] as usize / cols).collect::<Vec<_>>(), &[0, 4, 1, 5, 2, 6, 3, 7]);
    assert!(permute_rows(&v, rows, 5).is_err());
}

#[test]
fn tensor_roles_follow_llama_cpps_names() {
    assert_eq!(role_of("token_embd.weight", 2, false), Role::Embedding);
    assert_eq!(role_of("token_embd.weight", 2, true), Role::Output, "a tied embedding is the output head");
    assert_eq!(role_of("output.weight", 2, false), Role::Output);
    assert_eq!(role_of("blk.12.attn_v.weight", 2, false), Role::AttnV { layer: 12 });
    assert_eq!(role_of("blk.3.ffn_down.weight", 2, false), Role::FfnDown { layer: 3 });
    assert_eq!(role_of("blk.3.attn_norm.weight", 1, false), Role::Vector);
    assert_eq!(role_of("blk.3.attn_q.bias", 1, false), Role::Vector);
    assert_eq!(role_of("blk.3.attn_q.weight", 2, false), Role::Matrix);
}

#[test]
fn an_export_with_nothing_to_write_says_what_to_give() {
    let e = Export::new("whatever").run().unwrap_err().to_string();
    assert!(e.contains("--gguf") && e.contains("--hf"), "{e}");
    let e = Export::new("whatever").hf("/tmp/x").ollama(true).run().unwrap_err().to_string();
    assert!(e.contains("Modelfile goes beside a GGUF"), "{e}");
}
