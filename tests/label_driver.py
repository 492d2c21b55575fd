"""Drive the labeling app headless and print "ACK n" once decision n is committed (for the SIGKILL test).

    python tests/label_driver.py DATASET DB
"""
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import label  # noqa: E402

dataset, db = Path(sys.argv[1]), Path(sys.argv[2])
store = label.Store(db, quiet=True)
if store.project("p", missing_ok=True) is None:
    store.create_project("p", dataset, 8, False, False, "")
tasks = label.load_tasks(dataset)
app = label.make_app(store, store.project("p"), "driver", tasks, dataset, renderer="halfcell")


async def main():
    async with app.run_test(size=(120, 45)) as pilot:
        while app.pair is not None:
            left, right = app.pair
            await pilot.press("a" if left < right else "d")  # hidden order: lower index is better
            print(f"ACK {app.acknowledged}", flush=True)  # app.acknowledged counts committed decisions

asyncio.run(main())
