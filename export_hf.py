"""Export a checkpoint as a Hugging Face GPT-2 folder (config.json + model.safetensors).

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare

Every key: python export_hf.py --help. The code (both directions) is gptsmith/hf.py.
"""

from gptsmith.hf import main

if __name__ == "__main__":
    main()
