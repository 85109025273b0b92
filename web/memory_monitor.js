// Shows the Memory Monitor's summary on the node once the prompt has run.
import { app } from "../../scripts/app.js";

app.registerExtension({
    name: "Streamline.MemoryMonitor",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "StreamlineMemoryMonitor") return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = (message?.text ?? []).join("\n");
            let widget = this.widgets?.find((w) => w.name === "memory_summary");
            if (!widget) {
                widget = this.addWidget("text", "memory_summary", "", () => {}, { serialize: false });
            }
            widget.value = text;
            this.setDirtyCanvas(true, true);
        };
    },
});
