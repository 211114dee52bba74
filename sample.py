"""Sample text from a trained model (or OpenAI's GPT-2).

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?"

Every key, its default and meaning: python sample.py --help. The code is gptsmith/sampler.py.
"""

from gptsmith.sampler import main

if __name__ == "__main__":
    main()
